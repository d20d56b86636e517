"""`make demo` and the local hub it builds from installed PyPI packages (demo.prepare_hub)."""
