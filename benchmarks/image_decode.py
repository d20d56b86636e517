"""Image feature extraction with batches decoded ahead in a thread, against decoding each batch inline.

extract_image_features decodes and resizes the next batches (Pillow, the model's image processor) in threads while
the model runs (workers.features.prepared_in_order) when it expects a gain: beside a GPU, or on the CPU when torch
leaves a core free (threads_ahead). This times one thread ahead against the same extraction with the batches
prepared inline, interleaved, in one run, and prints the ratio of the best times (below 1: the thread helps).
`--torch-threads 1` leaves a core free, as a GPU machine has its CPU cores free for decoding.

Usage: python -m benchmarks.image_decode --data ZIP --models DIR[,DIR] [--images 600] [--repeats 3]
       [--torch-threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import workers.features as features
import workers.features.images as image_features
from benchmarks.collect_results import append_run

ORIGINAL = image_features.prepared_in_order


def with_threads(count: int) -> Callable[[Callable[[Any], Any], list[Any], int], Iterator[Any]]:
    """prepared_in_order with `count` threads whatever extract_image_features would choose (0: inline)."""
    return lambda prepare, items, ahead: ORIGINAL(prepare, items, count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="a zip of images (e.g. benchmarks.data.fashion_mnist's)")
    parser.add_argument("--models", required=True, help="comma-separated image model folders")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with zipfile.ZipFile(args.data) as archive:
        names = [n for n in archive.namelist() if n.lower().endswith((".png", ".jpg", ".jpeg"))][: args.images]
        images = [archive.read(n) for n in names]
    chosen = features.threads_ahead(False)
    lines = [f"Data: {args.data.name}, {len(images)} images; torch threads {torch.get_num_threads()}; "
             f"{args.repeats} interleaved repeats, best of each. Machine: {platform.machine()}, "
             f"{os.cpu_count()} cores, {datetime.now():%Y-%m-%d %H:%M}; extract_image_features would use "
             f"{chosen} decoding thread(s) here", "",
             "| model | inline s (decode + forward) | one thread ahead s | threaded / inline |", "|---|---|---|---|"]
    for folder in [Path(m) for m in args.models.split(",")]:
        features.extract_image_features(folder, images[:64], batch_size=32)  # warm-up: load, first-call costs
        best = {"inline": float("inf"), "threaded": float("inf")}
        for _ in range(args.repeats):
            for name, order in (("inline", with_threads(0)), ("threaded", with_threads(1))):
                image_features.prepared_in_order = order
                result = features.extract_image_features(folder, images, batch_size=32)
                best[name] = min(best[name], result.total_seconds - result.load_seconds)
        image_features.prepared_in_order = ORIGINAL
        lines.append(f"| {folder.name} | {best['inline']:.2f} | {best['threaded']:.2f} | "
                     f"{best['threaded'] / best['inline']:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        command = f"python -m benchmarks.image_decode --data {args.data} --models {args.models} " \
                  f"--images {args.images} --repeats {args.repeats} --torch-threads {args.torch_threads}"
        append_run(args.out, "Decoding image batches ahead in a thread (`benchmarks/image_decode.py`)", command, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
