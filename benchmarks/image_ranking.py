"""Image ranking on real data: does each estimator order image models as a held-out linear probe does, and what
does image feature extraction cost against the hardware?

Fashion-MNIST (Debian's dataset-fashion-mnist; benchmarks/data/fashion_mnist.py reads it) as PNG files, the same bytes a
zip upload stores, through `extract_image_features` (the service's path). Candidates: MobileNetV2 pretrained on
ImageNet (demo.prepare_hub's mobilenet_v2-imagenet, with its ImageNet head, so LEEP and NCE apply), the same
architecture randomly initialised, and a randomly initialised 2-layer 32-d ViT (the narrow model LogME's Occam
factor favours on text). Ground truth per sample: the test accuracy (on `--test` held-out test-split images) of an
L2 logistic probe fitted on the sample's features (strength by 3-fold CV: rank_vs_finetune's `linear_probe`).
Fine-tuning image models is not implemented, so a probe is the ground truth here, not a tuned model.

For each sample size and seed: every estimator's scores, weighted τ against the probe accuracies, top-1 agreement,
and how often the pretrained model is ranked above each random one. Speed: images per forward second, useful
GFLOP/s (FlopCounterMode's count) as a fraction of a float32 matrix product measured just before, and wall time
(load, decode, preprocess, forward) over forward time.

    python -m benchmarks.data.fashion_mnist ... (not needed: this reads the package directly)
    python -m benchmarks.image_ranking --package PKG --hub /tmp/ihub [--pool 2000] [--test 2000]
        [--sizes 50,100,300,1000] [--seeds 5] [--out benchmarks/results/image_ranking.md]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data.fashion_mnist import load_split, png_bytes, stratified
from benchmarks.feature_speed import machine_label, matmul_flops
from benchmarks.rank_vs_finetune import agreement, fmt, linear_probe

PRETRAINED = "mobilenet_v2-imagenet"
RANDOM_CNN = "random-init-mobilenet_v2"
RANDOM_VIT = "random-init-vit-32d"
METRICS = ["logme", "logme_projected", "ridge_loo", "hscore_shrinkage", "nleep", "leep", "nce"]


def features_of(folder: Path, images: list[bytes], batch_size: int) -> tuple[Any, dict[str, float]]:
    import torch

    from workers.features import extract_image_features

    matmul = matmul_flops("cpu", 2048, torch.float32)
    result = extract_image_features(folder, images, batch_size=batch_size, device="cpu")
    speed = {"images_per_s": len(images) / result.forward_seconds, "gflops": result.flops_per_second / 1e9,
             "fraction": result.flops_per_second / matmul, "matmul_gflops": matmul / 1e9,
             "wall_over_forward": result.total_seconds / result.forward_seconds,
             "mflops_per_image": result.flops_estimate / len(images) / 1e6}
    return result, speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="extracted dataset-fashion-mnist package")
    parser.add_argument("--hub", type=Path, required=True, help="demo.prepare_hub output with the image models")
    parser.add_argument("--pool", type=int, default=2000, help="train images samples are drawn from")
    parser.add_argument("--test", type=int, default=2000, help="held-out test-split images for the probe")
    parser.add_argument("--sizes", default="50,100,300,1000")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from tests.tiny_models import make_tiny_vit
    from workers.features import extract_image_features
    from workers.pipeline import sample_rows
    from workers.ranking import score_estimator

    train_images, train_labels = load_split(args.package, "train")
    test_images, test_labels = load_split(args.package, "t10k")
    pool = stratified(train_labels, args.pool, seed=0)
    held = stratified(test_labels, args.test, seed=0)
    pool_files = [png_bytes(train_images[i]) for i in pool]
    test_files = [png_bytes(test_images[i]) for i in held]
    y_pool, y_test = train_labels[pool].astype(np.int64), test_labels[held].astype(np.int64)

    folders = {PRETRAINED: args.hub / PRETRAINED, RANDOM_CNN: args.hub / RANDOM_CNN}
    for folder in folders.values():
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder} missing: python -m demo.prepare_hub --out {args.hub} --models "
                             f"{PRETRAINED},{RANDOM_CNN}")
    scratch = tempfile.TemporaryDirectory()
    folders[RANDOM_VIT] = make_tiny_vit(Path(scratch.name) / RANDOM_VIT, hidden_size=32, seed=0)

    pooled: dict[str, np.ndarray] = {}
    test_features: dict[str, np.ndarray] = {}
    probs: dict[str, np.ndarray | None] = {}
    speed: dict[str, dict[str, float]] = {}
    for name, folder in folders.items():
        result, speed[name] = features_of(folder, pool_files, args.batch_size)
        pooled[name], probs[name] = result.features.astype(np.float64), result.source_probs
        test_features[name] = extract_image_features(folder, test_files, batch_size=args.batch_size,
                                                     device="cpu").features.astype(np.float64)
        print(f"[features] {name}: {pooled[name].shape[1]}-d, {speed[name]['images_per_s']:.0f} images/s, "
              f"{speed[name]['fraction']:.2f} of matmul, wall/forward {speed[name]['wall_over_forward']:.2f}",
              flush=True)

    sizes = [int(s) for s in args.sizes.split(",")]
    names = list(folders)
    table: dict[int, dict[str, Any]] = {}
    for size in sizes:
        probe_acc = {n: [] for n in names}
        per_metric: dict[str, dict[str, list[float]]] = {m: {"tau": [], "top1": [], "vs_cnn": [], "vs_vit": []}
                                                         for m in METRICS}
        for seed in range(args.seeds):
            rows = sample_rows(y_pool, "classification", size, seed)
            y = y_pool[rows]
            accs = {n: linear_probe("classification", pooled[n][rows], y, test_features[n], y_test, seed)[0]
                    for n in names}
            for n in names:
                probe_acc[n].append(accs[n])
            for metric in METRICS:
                scores = {}
                for n in names:
                    value = score_estimator(metric, pooled[n][rows], y, "classification",
                                         source_probs=None if probs[n] is None else probs[n][rows])
                    if value is not None:
                        scores[n] = float(value)
                if len(scores) >= 2:
                    agreed = agreement([scores[n] for n in scores], [accs[n] for n in scores])
                    if agreed["weightedtau"] is not None:
                        per_metric[metric]["tau"].append(agreed["weightedtau"])
                        per_metric[metric]["top1"].append(agreed["top1"])
                for other, key in ((RANDOM_CNN, "vs_cnn"), (RANDOM_VIT, "vs_vit")):
                    if PRETRAINED in scores and other in scores:
                        per_metric[metric][key].append(float(scores[PRETRAINED] > scores[other]))
        table[size] = {"probe": {n: float(np.mean(v)) for n, v in probe_acc.items()},
                       "metrics": {m: {k: (float(np.mean(v)) if v else None) for k, v in d.items()}
                                   for m, d in per_metric.items()}}
        print(f"[size {size}] probe accuracy " + ", ".join(f"{n} {table[size]['probe'][n]:.3f}" for n in names),
              flush=True)

    lines = ["# Image ranking: Fashion-MNIST, three image models, held-out linear probe as ground truth", "",
             f"Machine: {machine_label('cpu')}, {platform.python_version()}; {time.strftime('%Y-%m-%d')}.",
             f"Command: `python -m benchmarks.image_ranking --package PKG --hub HUB --pool {args.pool} "
             f"--test {args.test} --sizes {args.sizes} --seeds {args.seeds}`", "",
             "Feature extraction (images as PNG bytes, as an upload stores them; 28×28 grayscale converted to RGB and "
             "resized by each model's image processor: 224×224 for MobileNetV2, 32×32 for the ViT):", "",
             "| model | dim | images/s | MFLOP/image | GFLOP/s | of matmul | wall / forward |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        s = speed[n]
        lines.append(f"| {n} | {pooled[n].shape[1]} | {s['images_per_s']:.0f} | {s['mflops_per_image']:.0f} | "
                     f"{s['gflops']:.1f} | {s['fraction']:.2f} | {s['wall_over_forward']:.2f} |")
    lines += ["", f"Probe test accuracy (mean over {args.seeds} seeds; {args.test} held-out test images):", "",
              "| rows | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for size in sizes:
        lines.append(f"| {size} | " + " | ".join(f"{table[size]['probe'][n]:.3f}" for n in names) + " |")
    lines += ["", "Per estimator, mean over seeds: weighted τ against probe accuracy (models with a score), top-1 "
              "agreement, and the share of seeds ranking the pretrained model above the random CNN / random ViT "
              "(LEEP and NCE: only the pretrained model has a source head, so no τ):", "",
              "| rows | estimator | weighted τ | top-1 | pretrained > random CNN | pretrained > random ViT |",
              "|---|---|---|---|---|---|"]
    for size in sizes:
        for metric in METRICS:
            m = table[size]["metrics"][metric]
            lines.append(f"| {size} | {metric} | {fmt(m['tau'], 2)} | {fmt(m['top1'], 2)} | {fmt(m['vs_cnn'], 2)} | "
                         f"{fmt(m['vs_vit'], 2)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    scratch.cleanup()


if __name__ == "__main__":
    main()
