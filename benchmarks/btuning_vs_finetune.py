"""B-Tuning against plain fine-tuning of the same target, through the service as a user runs them.

Starts `hubtune serve` (embedded default: SQLite, filesystem broker, worker child) in a temporary HUBTUNE_HOME,
registers the models, uploads the dataset (any upload: a CSV/JSONL/Parquet of texts, or a zip of images), and for
each seed submits two tune jobs on the same split (the split follows the seed): `finetune` of the target, and
`btuning` of the target with the top-k models by LogME as teachers (its tradeoff as a job gets it by default,
"auto": chosen by trial runs on the training split, unless --tradeoff gives a number or values to choose among).
Reports validation accuracy and macro-F1 per seed, their means, and the paired differences. The first model is the
target unless --target names another.

    python -m benchmarks.btuning_vs_finetune --hub /tmp/ihub --data /tmp/fm/fashion1000.zip \
        --models mobilenet_v2-imagenet,random-init-mobilenet_v2 --seeds 0,1,2 --epochs 3 --lr 5e-4
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from demo.run import start_service
from service.client import Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hub", type=Path, required=True, help="folder holding the model folders")
    parser.add_argument("--models", required=True, help="comma-separated model folder names (teachers)")
    parser.add_argument("--target", default="", help="model folder name to tune (default: the first of --models)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--text-pair-column", default=None, help="text pairs: the column of each row's second text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text or pair when tuning")
    parser.add_argument("--top-k", type=int, default=0, help="B-Tuning teachers (default: all models)")
    parser.add_argument("--tradeoff", default="auto",
                        help='B-Tuning tradeoff: a number, comma-separated values to choose among, or "auto"')
    parser.add_argument("--port", type=int, default=18775)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "btuning_vs_finetune.md")
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    target = args.target or names[0]
    seeds = [int(s) for s in args.seeds.split(",")]
    began = time.perf_counter()
    rows: list[tuple[int, str, dict, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_service(Path(tmp), args.port, quiet=True)
        try:
            client = Client(url)
            ids = {name: client.add_model(path=str(args.hub / name), name=name)["id"] for name in names}
            form = {"task": "classification"}
            if args.data.suffix != ".zip":
                form.update(text_column=args.text_column, label_column=args.label_column)
                if args.text_pair_column:
                    form["text_pair_column"] = args.text_pair_column
            with args.data.open("rb") as fh:
                dataset = client._check(client.http.post("/v1/datasets", files={"file": (args.data.name, fh)},
                                                         data=form, timeout=None))
            tradeoff: Any = args.tradeoff if args.tradeoff == "auto" else [float(v) for v in args.tradeoff.split(",")]
            tradeoff = tradeoff[0] if isinstance(tradeoff, list) and len(tradeoff) == 1 else tradeoff
            trials: list[str] = []
            common = {"target": ids[target], "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                      "max_length": args.max_length}
            for seed in seeds:
                for strategy in ("finetune", "btuning"):
                    tune = {"strategy": strategy, "seed": seed, **common}
                    if strategy == "btuning":
                        tune["top_k"] = args.top_k or len(names)
                        tune["tradeoff"] = tradeoff
                    job = client.post("/v1/jobs", {"dataset_id": dataset["id"], "metrics": ["logme"], "tune": tune})
                    job = client.watch(job["id"], interval=1.0, out=open(os.devnull, "w"))
                    if job["status"] != "succeeded":
                        raise SystemExit(f"{strategy} seed {seed}: {job['status']}: {job.get('error')}")
                    (model,) = job["tuning"]["models"]
                    job_wall = (datetime.fromisoformat(job["finished_at"])
                                - datetime.fromisoformat(job["started_at"])).total_seconds()
                    used = model["config"]["tradeoff"] if strategy == "btuning" else None
                    rows.append((seed, strategy, used, model["metrics"], model["wall_seconds"], job_wall))
                    print(seed, strategy, model["metrics"], f"{model['wall_seconds']:.0f}s", flush=True)
                    if strategy == "btuning":
                        teachers = model["details"]["btuning"]
                        selection = model["details"].get("tradeoff_selection")
                        if selection and selection["trials"]:
                            trials.append(f"seed {seed}: " + ", ".join(
                                f"{t['tradeoff']:g} → {t['val_loss']:.3f} ({t['accuracy']:.3f})"
                                for t in selection["trials"]))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)

    def mean(strategy: str, key: str) -> float:
        return statistics.fmean(m[key] for _, s, _, m, _, _ in rows if s == strategy)

    diffs = [b[3]["accuracy"] - f[3]["accuracy"] for f, b in zip(rows[0::2], rows[1::2])]
    described = zip(teachers["teachers"], teachers["weights"], teachers["scores"])
    lines = [f"Command: `python -m benchmarks.btuning_vs_finetune {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), CPU; data {args.data.name} "
             f"({dataset['rows']} rows, validation 20%, split by seed); target {target}; teachers "
             f"{', '.join(f'{n} (π={w:.3f}, LogME {s:.3f})' for n, w, s in described)}; "
             f"{args.epochs} epochs, lr {args.lr}, batch {args.batch_size}, max_length {args.max_length}, "
             f"tradeoff {args.tradeoff}, temperature 0.1; "
             f"{time.perf_counter() - began:.0f} s in all.", "",
             "| seed | strategy | tradeoff | accuracy | macro-F1 | ECE | training s | job s |",
             "|---|---|---|---|---|---|---|---|"]
    for seed, strategy, used, metrics, wall, job_wall in rows:
        lines.append(f"| {seed} | {strategy} | {'' if used is None else f'{used:g}'} | {metrics['accuracy']:.3f} | "
                     f"{metrics['macro_f1']:.3f} | {metrics['ece']:.3f} | {wall:.0f} | {job_wall:.0f} |")
    lines += ["", f"Mean accuracy: finetune {mean('finetune', 'accuracy'):.3f}, "
              f"btuning {mean('btuning', 'accuracy'):.3f}; "
              f"paired difference (btuning − finetune) per seed: {', '.join(f'{d:+.3f}' for d in diffs)}."]
    if trials:
        lines += ["", "Tradeoff trials (on 80% of the training split, judged on the other 20%): value → held-out loss "
                  "(accuracy); " + "; ".join(trials) + ". training s: the final run; job s: the whole job, trials "
                  "included."]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# B-Tuning against fine-tuning through the service (`benchmarks/btuning_vs_finetune.py`)\n\n"
                        + "\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
