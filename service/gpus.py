"""`hubtune worker --gpus`: one Celery worker process per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES).

Torch-free (the CLI imports it): the GPUs are listed by nvidia-smi, or read from CUDA_VISIBLE_DEVICES when that
is set, since a process must not use a GPU it was not given.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping


class GpuSpecError(ValueError):
    """`--gpus` names no GPU this machine shows."""


def list_gpus(environ: Mapping[str, str] | None = None, nvidia_smi: str | None = None) -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries when set, else nvidia-smi's indices."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry.strip() for entry in visible.split(",") if entry.strip() and entry.strip() != "-1"]
    tool = nvidia_smi or shutil.which("nvidia-smi")
    if tool is None:
        return []
    try:
        done = subprocess.run([tool, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def choose_gpus(spec: str, available: list[str]) -> list[str]:
    """`all`, a count (the first N), or a comma-separated list of GPU ids (used as given: ids, or UUIDs)."""
    spec = spec.strip()
    if spec == "all":
        if not available:
            raise GpuSpecError("--gpus all: no GPU is visible (nvidia-smi lists none, or CUDA_VISIBLE_DEVICES is "
                               "empty)")
        return available
    if spec.isdigit():
        count = int(spec)
        if count < 1 or count > len(available):
            raise GpuSpecError(f"--gpus {count}: {len(available)} GPU(s) visible")
        return available[:count]
    chosen = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if not chosen or len(set(chosen)) != len(chosen):
        raise GpuSpecError(f"--gpus {spec!r}: expected all, a count, or distinct GPU ids such as 0,1")
    return chosen


def run_per_gpu(gpus: list[str], command_for: Callable[[str], list[str]],
                preexec_fn: Callable[[], None] | None = None, stop_seconds: float = 60.0) -> int:
    """Run command_for(gpu) once per GPU, each with CUDA_VISIBLE_DEVICES=gpu, until one ends or this process is
    asked to stop (SIGTERM, SIGINT): then stop them all (SIGTERM, then SIGKILL after stop_seconds) and return the
    first exit code, so a supervisor restarts the set, not a part of it."""
    children = [subprocess.Popen(command_for(gpu), env=dict(os.environ, CUDA_VISIBLE_DEVICES=gpu),
                                 preexec_fn=preexec_fn) for gpu in gpus]
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: stopping.append(128 + number))
    ended: list[int] = []  # the exit code of the first to end on its own
    try:
        while not stopping and not ended:
            ended = [code for code in (child.poll() for child in children) if code is not None]
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + stop_seconds
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return stopping[0] if stopping else ended[0] if ended else 0
