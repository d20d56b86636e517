"""`make demo`: build a local hub of real pretrained models, start HubTune on its embedded default, upload BBC News,
rank the models by LogME, print the ranking, stop the service.

Uses HUBTUNE_HOME if set, else the default ~/.hubtune. Keyless: the service binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.client import Client, ranking_table
from service.contract import JobStatus
from service.settings import Settings


def free_port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the service exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service did not become healthy")


def start_service(home: Path, preferred_port: int, quiet: bool = False) -> tuple[subprocess.Popen, str]:
    """`hubtune serve` on its embedded default (SQLite, filesystem broker, worker child) with HUBTUNE_HOME=home, on
    preferred_port or, when that is taken, a free one: a service already holding the port would answer the health
    check and take the jobs. Returns the process (its own session: stop it with os.killpg) and its URL, healthy."""
    port = free_port(preferred_port)
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HUBTUNE_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    output = subprocess.DEVNULL if quiet else None
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=output, stderr=output, start_new_session=True)
    try:
        wait_healthy(url, server)
    except BaseException:
        os.killpg(server.pid, signal.SIGTERM)
        raise
    return server, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=400, help="BBC News sample size (stratified)")
    parser.add_argument("--port", type=int, default=8000)
    # hscore, gbc and sfda saturate when rows <= feature width (400 rows, 384-768-d here): not shown by default
    parser.add_argument("--metrics", default="ridge_loo,logme,logme_projected,hscore_shrinkage,nleep")
    parser.add_argument("--models", default="", help="comma-separated model folder names to use; default all")
    args = parser.parse_args(argv)

    settings = Settings()
    hub_dir = settings.home_dir / "demo-hub"
    began = time.perf_counter()
    print(f"[demo] preparing the local hub in {hub_dir} (first run converts the packaged weights)", flush=True)
    subprocess.run([sys.executable, "-m", "demo.prepare_hub", "--out", str(hub_dir), "--rows", str(args.rows)],
                   check=True)
    prepared = time.perf_counter()

    print("[demo] starting `hubtune serve` (SQLite + filesystem broker + worker child)", flush=True)
    server, url = start_service(settings.home_dir, args.port)
    print(f"[demo] serving on {url}", flush=True)
    try:
        client = Client(url)
        wanted = {m for m in args.models.split(",") if m}
        folders = sorted(p for p in hub_dir.iterdir() if (p / "config.json").is_file()
                         and (not wanted or p.name in wanted))
        for folder in folders:
            model = client.add_model(path=str(folder), name=folder.name)
            print(f"[demo] model {model['name']}: {model['model_type']}, {model['hidden_size']}-d", flush=True)
        dataset = client.upload(hub_dir / "bbc_news.csv", "classification", "text", "label")
        print(f"[demo] dataset {dataset['id']}: {dataset['rows']} rows, classes {dataset['class_counts']}",
              flush=True)
        metrics = [m for m in args.metrics.split(",") if m]
        job = client.post("/v1/jobs", {"dataset_id": dataset["id"], "metrics": metrics})
        print(f"[demo] rank job {job['id']} submitted; watching", flush=True)
        submitted = time.perf_counter()
        job = client.watch(job["id"])
        ranked = time.perf_counter()
        print(f"\njob {job['id']}: {job['status']}")
        if job["status"] != JobStatus.SUCCEEDED:
            print(f"error: {job['error']}")
            return 1
        print(ranking_table(job))
        print(f"\n[demo] hub preparation {prepared - began:.1f}s; rank job {ranked - submitted:.1f}s; "
              f"total {ranked - began:.1f}s")
        print(f"[demo] the service's state is in {settings.home_dir}; run `hubtune serve` to keep using it")
        port = url.rsplit(":", 1)[1]
        print(f"[demo] the job's page (ranking chart, feature maps), once `hubtune serve --port {port}` runs:\n"
              f"{url}/jobs/{job['id']}")
        return 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
