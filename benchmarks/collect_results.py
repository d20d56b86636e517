"""Rebuild benchmarks/RESULTS.md from the per-benchmark files in benchmarks/results/ (each script writes its own).

Usage: python -m benchmarks.collect_results
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["logme_speed", "feature_speed", "tokenize_ahead", "rank_overhead", "rank_overhead_images", "halving", "occam", "rank_vs_finetune", "rank_vs_finetune_lr2e-4", "rank_vs_finetune_headpool", "rank_vs_finetune_kaomoji", "rank_vs_finetune_austen", "rank_vs_finetune_pairs", "image_ranking", "rank_vs_finetune_fashion", "image_decode", "logme_intervals", "tune_compare", "btuning_text", "btuning_vs_finetune", "btuning_vs_finetune_pairs"]


def append_run(path: Path, title: str, command: str, text: str) -> None:
    """Add one run (its command and output) to a benchmark's results file, below the runs already there; a new
    file starts with `title`."""
    previous = path.read_text(encoding="utf-8") if path.is_file() else f"# {title}\n"
    path.write_text(previous.rstrip() + f"\n\nCommand: `{command}`  \n{text}\n", encoding="utf-8")


def main() -> None:
    parts = [(HERE / "results" / "_summary.md").read_text(encoding="utf-8").rstrip() + "\n"]
    names = [n for n in ORDER if (HERE / "results" / f"{n}.md").is_file()]
    names += sorted(p.stem for p in (HERE / "results").glob("*.md") if p.stem not in ORDER and p.stem != "_summary")
    for name in names:
        text = (HERE / "results" / f"{name}.md").read_text(encoding="utf-8").rstrip()
        # Demote the file's headings one level so each benchmark is a section of RESULTS.md.
        text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
        parts.append(f"\n---\n<!-- from benchmarks/results/{name}.md -->\n{text}\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote {HERE / 'RESULTS.md'} from {len(names)} result files")


if __name__ == "__main__":
    main()
