"""`hubtune worker --gpus`: which GPUs, and one process per GPU that starts and stops as a set (service/gpus.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service.gpus import GpuSpecError, choose_gpus, list_gpus
from tests.integration.conftest import REPO
from tests.integration.faults import process_alive


def test_visible_devices_decide_which_gpus_a_worker_may_use(tmp_path: Path) -> None:
    assert list_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert list_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert list_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n'\n")
    fake.chmod(0o755)
    assert list_gpus({}, nvidia_smi=str(fake)) == ["0", "1", "2"]
    broken = tmp_path / "broken-smi"
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    broken.chmod(0o755)
    assert list_gpus({}, nvidia_smi=str(broken)) == []


def test_gpus_spec_all_count_or_ids() -> None:
    assert choose_gpus("all", ["0", "1"]) == ["0", "1"]
    assert choose_gpus("1", ["0", "1"]) == ["0"]
    assert choose_gpus("1,3", []) == ["1", "3"]
    for bad, available in [("all", []), ("3", ["0"]), ("0", ["0"]), ("1,1", ["0", "1"]), (",", ["0"])]:
        with pytest.raises(GpuSpecError):
            choose_gpus(bad, available)


def _supervisor(tmp_path: Path, child_code: str) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import sys
        from service.gpus import run_per_gpu
        child = [sys.executable, "-c", {child_code!r}]
        sys.exit(run_per_gpu(["0", "1"], lambda gpu: child + [gpu, {str(tmp_path)!r}], stop_seconds=5))
    """)
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={"PYTHONPATH": str(REPO)})


CHILD = """
import os, sys, time, pathlib
gpu, folder = sys.argv[1], pathlib.Path(sys.argv[2])
(folder / f"child-{gpu}").write_text(os.environ["CUDA_VISIBLE_DEVICES"] + " " + str(os.getpid()))
if gpu == "1" and (folder / "fail").exists():
    sys.exit(3)
time.sleep(60)
"""


def _wait_for_children(tmp_path: Path) -> dict[str, list[str]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(list(tmp_path.glob("child-*"))) < 2:
        time.sleep(0.05)
    return {p.name: p.read_text().split() for p in tmp_path.glob("child-*")}




def test_one_process_per_gpu_each_seeing_its_own_and_stopped_together(tmp_path: Path) -> None:
    supervisor = _supervisor(tmp_path, CHILD)
    children = _wait_for_children(tmp_path)
    assert {name: seen[0] for name, seen in children.items()} == {"child-0": "0", "child-1": "1"}
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=20) == 128 + signal.SIGTERM
    assert not any(process_alive(int(seen[1])) for seen in children.values())


def test_one_worker_ending_stops_the_set_with_its_exit_code(tmp_path: Path) -> None:
    (tmp_path / "fail").write_text("")
    supervisor = _supervisor(tmp_path, CHILD)
    children = _wait_for_children(tmp_path)
    assert supervisor.wait(timeout=20) == 3
    assert not process_alive(int(children["child-0"][1]))
