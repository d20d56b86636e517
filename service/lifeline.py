"""A child process that must not outlive the process that started it (`hubtune serve`'s worker child): Linux's
parent-death signal, and a watch on the parent's pid where that signal cannot reach (other systems, or a parent
whose forking thread is gone)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PARENT_PID_ENV = "HUBTUNE_PARENT_PID"  # set by `hubtune serve` on its worker child
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(signum: int = signal.SIGKILL, parent_pid: int | None = None) -> None:
    """Ask the kernel to send `signum` to this process when its parent dies. If the parent already died before the
    request (a fork racing its parent's death), exit now. No-op off Linux (see watch_parent)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def parent_death_signal(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """A subprocess.Popen preexec_fn: the child gets `signum` when the calling process dies. libc is looked up here,
    before the fork, so the child only makes the call."""
    prctl = _prctl()
    parent = os.getpid()

    def in_child() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return in_child


def watch_parent(parent_pid: int, on_orphaned: Callable[[], None], interval: float = 0.5) -> threading.Thread:
    """A daemon thread calling `on_orphaned` once the parent is gone (this process re-parented to another)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        on_orphaned()

    thread = threading.Thread(target=watch, name="hubtune-parent-watch", daemon=True)
    thread.start()
    return thread


def kill_own_group() -> None:
    """SIGKILL this process and, when it leads its process group (the worker child of `serve` does), the whole
    group: the Celery main process with its pool children, mid-task. A running job's lease then expires and the
    reconciler re-queues it."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
