"""Text feature extraction with chunks tokenised ahead in a thread, against tokenising every text first.

On a fast GPU the forward passes of small models take less time than tokenising their texts on the CPU (H100,
8900 BBC articles at 128 tokens: MiniLM-L3's forward passes 0.10 s, extract_features 1.27 s; benchmarks/RESULTS.md,
feature_speed). extract_features therefore tokenises and pads chunks of texts in a thread while the model runs
(workers.features.text_chunks) beside a GPU; `tokenize_ahead=True` forces it on the CPU, as here.

No GPU here, so this emulates that regime on the CPU: each model's own tokenizer and architecture, narrowed
(`--narrow HIDDEN,LAYERS`, random weights) until its forward passes take about as long as tokenising, with torch on
one thread so a core is free, as a GPU machine's cores are. It times extract_features with the chunks tokenised
ahead (one thread) against every text tokenised first (the inline path, one global length sort), and the case of a
later candidate of the same job with the same tokenizer (ids from the job's TokenIdsCache, nothing tokenised),
interleaved in one run, best of each, and prints: wall (without model loading) / forward seconds for each (the
issue's ≤ 1.3 target for the whole job), the ratio of the walls, the padded-token waste (chunks are sorted on
their own), and the largest difference between the feature matrices of the first two.

Usage: python -m benchmarks.tokenize_ahead --hub DIR --models NAME[,NAME] [--rows 0] [--max-length 128]
       [--batch-size 256] [--narrow 64,2] [--repeats 3] [--torch-threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.collect_results import append_run
from benchmarks.feature_speed import cpu_model, load_texts


def narrowed_copy(model_dir: Path, into: Path, hidden: int, layers: int) -> Path:
    """model_dir's tokenizer and architecture with `hidden` width and `layers` layers, random weights."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel

    target = into / model_dir.name
    target.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.is_file() and item.suffix in (".json", ".txt", ".model", ".jinja") and item.name != "config.json":
            shutil.copy2(item, target / item.name)
    config = AutoConfig.from_pretrained(model_dir)
    heads = 2
    for name, value in (("hidden_size", hidden), ("num_hidden_layers", layers), ("intermediate_size", 2 * hidden),
                        ("num_attention_heads", heads), ("num_key_value_heads", heads), ("head_dim", hidden // heads)):
        if hasattr(config, name):
            setattr(config, name, value)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(target, safe_serialization=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", type=Path, required=True, help="folder of model folders (demo.prepare_hub's)")
    parser.add_argument("--models", required=True, help="comma-separated model folder names under --hub")
    parser.add_argument("--rows", type=int, default=0, help="BBC News articles (0: all 2225)")
    parser.add_argument("--copies", type=int, default=4, help="the texts repeated this many times (H100 run: 4)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256, help="the service's GPU default")
    parser.add_argument("--narrow", default="64,2", help="HIDDEN,LAYERS of the narrowed copies")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from workers.features import TokenIdsCache, extract_features

    torch.set_num_threads(args.torch_threads)
    hidden, layers = (int(v) for v in args.narrow.split(","))
    texts = load_texts(args.rows, 0, None) * args.copies
    lines = [f"Machine: CPU {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
             f"{platform.python_version()}; {len(texts)} BBC News texts ({args.copies} copies), max length "
             f"{args.max_length}, batch {args.batch_size}; models narrowed to {hidden}-d, {layers} layers (random "
             f"weights, own tokenizer); {args.repeats} interleaved repeats, best of each; "
             f"{datetime.now():%Y-%m-%d %H:%M}", "",
             "| model | tokenise-first wall / fwd | ahead wall / fwd | ahead / tokenise-first wall | shared ids wall / "
             "fwd | waste first / ahead | max abs diff |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = narrowed_copy(args.hub / name, Path(tmp), hidden, layers)
            extract_features(folder, texts[:64], max_length=args.max_length)  # warm-up: first-call costs
            shared = TokenIdsCache(len(texts))  # filled by a first candidate with this tokenizer
            extract_features(folder, texts, max_length=args.max_length, batch_size=args.batch_size, token_ids=shared)
            best: dict[str, Any] = {}
            for _ in range(args.repeats):
                for mode in ("first", "ahead", "shared"):
                    result = extract_features(folder, texts, max_length=args.max_length, batch_size=args.batch_size,
                                              tokenize_ahead=mode != "first",
                                              token_ids=shared if mode == "shared" else None)
                    wall = result.total_seconds - result.load_seconds
                    if mode not in best or wall < best[mode][0]:
                        best[mode] = (wall, result)
            (first_wall, first), (ahead_wall, ahead_result) = best["first"], best["ahead"]
            shared_wall, shared_result = best["shared"]
            diff = float(np.abs(first.features - ahead_result.features).max())
            lines.append(f"| {name} | {first_wall:.2f} / {first.forward_seconds:.2f} = "
                         f"{first_wall / first.forward_seconds:.2f} | {ahead_wall:.2f} / "
                         f"{ahead_result.forward_seconds:.2f} = {ahead_wall / ahead_result.forward_seconds:.2f} | "
                         f"{ahead_wall / first_wall:.3f} | {shared_wall:.2f} / {shared_result.forward_seconds:.2f} = "
                         f"{shared_wall / shared_result.forward_seconds:.2f} | {first.padding_waste:.1%} / "
                         f"{ahead_result.padding_waste:.1%} | {diff:.1e} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        command = " ".join(["python -m benchmarks.tokenize_ahead", *(sys.argv[1:] if argv is None else argv)])
        append_run(args.out, "Tokenising text chunks ahead in a thread (`benchmarks/tokenize_ahead.py`)", command, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
