"""Helpers for benchmark results, and a check of benchmarks/RESULTS.md.

benchmarks/RESULTS.md is the one current document: a section per benchmark with its command, machine and latest
table. A script writes its raw output to benchmarks/results/<name>.md (or its --out); those Markdown files are not
committed. After a run, replace the benchmark's section in RESULTS.md with the new command, machine and table, and
put what the numbers mean in docs/findings.md. The JSON stores in benchmarks/results/ are committed:
rank_vs_finetune and tune_compare resume from them and rebuild their tables from them.

Usage: python -m benchmarks.collect_results
    checks that every benchmark script has a section in RESULTS.md, that each section names its command and
    machine, and lists raw outputs in benchmarks/results/ newer than RESULTS.md (runs not yet copied in).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
# Modules of benchmarks/ that are not benchmarks.
NOT_BENCHMARKS = {"__init__", "collect_results", "selection_report"}
# Sections of RESULTS.md that summarise other sections rather than report a run.
SUMMARY_SECTIONS = {"Targets"}


def append_run(path: Path, title: str, command: str, text: str) -> None:
    """Add one run (its command and output) to a benchmark's results file, below the runs already there; a new
    file starts with `title`."""
    previous = path.read_text(encoding="utf-8") if path.is_file() else f"# {title}\n"
    path.write_text(previous.rstrip() + f"\n\nCommand: `{command}`  \n{text}\n", encoding="utf-8")


def sections(text: str) -> dict[str, str]:
    """RESULTS.md's `## name` sections: {name: body}."""
    out: dict[str, str] = {}
    for chunk in ("\n" + text).split("\n## ")[1:]:
        name, _, body = chunk.partition("\n")
        out[name.strip()] = body
    return out


def problems(results: Path = RESULTS, scripts: Path = HERE) -> list[str]:
    """What is missing from RESULTS.md: a script without a section, a section without its command or machine."""
    found = sections(results.read_text(encoding="utf-8"))
    out = []
    for script in sorted(p.stem for p in scripts.glob("*.py") if p.stem not in NOT_BENCHMARKS):
        if not any(name == script or name.startswith(script + "_") for name in found):
            out.append(f"{script}: no section in {results.name}")
    for name, body in found.items():
        if name in SUMMARY_SECTIONS:
            continue
        for word in ("Command", "Machine"):
            if word not in body:
                out.append(f"{name}: its section names no {word.lower()}")
    return out


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    newer = sorted(p.name for p in (HERE / "results").glob("*.md") if p.stat().st_mtime > RESULTS.stat().st_mtime)
    for name in newer:
        print(f"results/{name} is newer than {RESULTS.name}: copy its latest table into the section")
    if not found:
        print(f"{RESULTS.name}: every benchmark has a section with its command and machine")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
