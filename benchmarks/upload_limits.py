"""Hostile uploads against a real API process: what each costs the server (issue 19, items 4-7).

Starts `hubtune serve --no-worker` from a source tree (default: this one; `--tree` runs another, e.g. an export of
an older commit) on a fresh HUBTUNE_HOME, sends each payload of tests/hostile_uploads.py and reports the answer
(status, media type, body size, title) and what the server process spent on it: wall time, CPU time, peak RSS
growth (reset per case through /proc/PID/clear_refs) and bytes written. The last case kills the server while it
parses an upload, starts it again and counts the `.upload-*` scratch files left in the datasets folder.

Usage: python -m benchmarks.upload_limits [--tree DIR] [--cases a,b] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from benchmarks.collect_results import append_run
from tests import hostile_uploads as hostile

HERE = Path(__file__).resolve().parents[1]
ONE_MB = 1024 * 1024
DEFAULT_CAP = 512 * ONE_MB


@dataclass
class Server:
    tree: Path
    home: Path
    cap: int
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from tests.integration.conftest import free_port

        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUBTUNE_")}
        env.update(HUBTUNE_HOME=str(self.home), HUBTUNE_AUTH="auto", HUBTUNE_MAX_UPLOAD_BYTES=str(self.cap),
                   PYTHONPATH=str(self.tree), OMP_NUM_THREADS="1")
        log = (self.home / "api.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--no-worker", "--host",
                                      "127.0.0.1", "--port", str(self.port)], cwd=self.tree, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"the API did not start: {(self.home / 'api.log').read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Row:
    case: str
    cap: int
    request: str
    status: str
    media: str
    body_bytes: int
    title: str
    spent: hostile.Spent


def upload(server: Server, content: bytes, name: str, timeout: float) -> tuple[str, str, int, str]:
    try:
        response = httpx.post(f"{server.url}/v1/datasets", files={"file": (name, content)},
                              data={"task": "classification"}, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"no answer ({type(exc).__name__})", "", 0, ""
    media = response.headers.get("content-type", "").split(";")[0]
    title = response.json().get("title", "") if media.endswith("json") and response.status_code >= 400 else ""
    return str(response.status_code), media, len(response.content), title[:40]


def raw(answer: hostile.RawResponse) -> tuple[str, str, int, str]:
    if answer.status is None:
        return f"no answer in {answer.seconds:.0f} s", "", 0, ""
    return str(answer.status), answer.headers.get("content-type", "").split(";")[0], len(answer.body), ""


Send = Callable[[Server, bytes], tuple[str, str, int, str]]


def cases(scratch: Path) -> dict[str, tuple[int, str, Callable[[], bytes], Send]]:
    """name -> (upload cap, what is sent, make the payload (before the server is measured), send it)."""
    def file(name: str, timeout: float) -> Send:
        return lambda server, payload: upload(server, payload, name, timeout)

    nothing = lambda: b""  # noqa: E731
    return {
        "content_length": (ONE_MB, "Content-Length: 10 GB declared, 1 KB sent", nothing,
                           lambda s, _: raw(hostile.send_declared("127.0.0.1", s.port, 10 * 1024 ** 3, 1024, 15))),
        "chunked": (ONE_MB, "300 MB chunked, no Content-Length", nothing,
                    lambda s, _: raw(hostile.send_chunked("127.0.0.1", s.port, 300 * ONE_MB, 60))),
        "lying_zip": (ONE_MB, "zip member declares 100 B, inflates to 1 GB",
                      lambda: hostile.lying_zip(scratch / "lie.zip", 100, 1024 ** 3).read_bytes(),
                      file("d.zip", 120)),
        "zip_bomb": (DEFAULT_CAP, "honest zip bomb, 2 × 200 MB",
                     lambda: hostile.zip_bomb(scratch / "bomb.zip", 200 * ONE_MB).read_bytes(), file("d.zip", 120)),
        "pixels": (DEFAULT_CAP, "40 PNGs of 40 MP",
                   lambda: hostile.pixel_zip(scratch / "px.zip", 40, 8000, 5000).read_bytes(), file("d.zip", 300)),
        "wide_csv": (ONE_MB, "CSV of 100k columns", lambda: hostile.wide_csv(100_000), file("d.csv", 600)),
        "dictionary_parquet": (ONE_MB, "dictionary-encoded Parquet, 3M rows",
                               lambda: hostile.dictionary_parquet(scratch / "d.parquet", 3_000_000).read_bytes(),
                               file("d.parquet", 120)),
        "long_header": (DEFAULT_CAP, "CSV whose header is 50 MB", lambda: hostile.long_header_csv(50 * ONE_MB),
                        file("d.csv", 120)),
    }


def run_case(tree: Path, name: str, cap: int, request: str, make: Callable[[], bytes], send: Send,
             root: Path) -> Row:
    payload = make()
    server = Server(tree, Path(tempfile.mkdtemp(dir=root)), cap)
    server.start()
    try:
        assert server.proc is not None
        with hostile.spent(server.proc.pid) as used:
            status, media, size, title = send(server, payload)
            time.sleep(0.5)  # what the server still does after answering counts too
        return Row(name, cap, request, status, media, size, title, used)
    finally:
        server.stop()


def stale_scratch(tree: Path, root: Path) -> str:
    """Kill the API mid-parse, start it again: the `.upload-*` files left in the datasets folder."""
    server = Server(tree, Path(tempfile.mkdtemp(dir=root)), DEFAULT_CAP)
    server.start()
    datasets = server.home / "artifacts" / "datasets"
    rows = "".join(f"text {i} with some words,{'ab'[i % 2]}\n" for i in range(600_000))
    content = ("text,label\n" + rows).encode()
    import threading

    thread = threading.Thread(target=upload, args=(server, content, "d.csv", 60), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not scratch_files(datasets):
        time.sleep(0.005)
    during = len(scratch_files(datasets))
    server.stop(signal.SIGKILL)
    killed = len(scratch_files(datasets))
    server.start()
    after = len(scratch_files(datasets))
    server.stop()
    return f"scratch files while parsing: {during}; after SIGKILL: {killed}; after the API started again: {after}"


def scratch_files(datasets: Path) -> list[Path]:
    return [p for p in datasets.rglob("*") if p.is_file() and ".upload-" in str(p.relative_to(datasets))]


def table(rows: list[Row]) -> str:
    lines = ["| case | cap | request | answer | media type | body bytes | title | server: wall s | CPU s | "
             "peak RSS +MB | written MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cap = "1 MB" if r.cap == ONE_MB else f"{r.cap // ONE_MB} MB"
        lines.append(f"| {r.case} | {cap} | {r.request} | {r.status} | {r.media} | {r.body_bytes} | {r.title} | "
                     f"{r.spent.seconds:.2f} | {r.spent.cpu_seconds:.2f} | {r.spent.peak_rss_growth / ONE_MB:.0f} | "
                     f"{r.spent.written / ONE_MB:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=HERE, help="the source tree the API runs from")
    parser.add_argument("--cases", help="comma-separated case names (default: all, then the stale-scratch case)")
    parser.add_argument("--out", type=Path, default=HERE / "benchmarks" / "results" / "upload_limits.md")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="upload-limits-"))
    chosen = cases(root)
    names = args.cases.split(",") if args.cases else [*chosen, "stale_scratch"]
    rows = []
    notes = []
    for name in names:
        if name == "stale_scratch":
            notes.append(stale_scratch(args.tree.resolve(), root))
            print(notes[-1], flush=True)
            continue
        cap, request, make, send = chosen[name]
        rows.append(run_case(args.tree.resolve(), name, cap, request, make, send, root))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = (f"Tree: {args.tree.resolve()}. Machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{datetime.now():%Y-%m-%d %H:%M}\n\n{table(rows)}\n" + "".join(f"\n{n}\n" for n in notes))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    append_run(args.out, "upload_limits", "python -m benchmarks.upload_limits " + " ".join(argv or sys.argv[1:]),
               text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
