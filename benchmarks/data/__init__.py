"""One-off writers of the real datasets the benchmarks read (each module: `python -m benchmarks.data.NAME --help`)."""
