"""Where and how the forward passes run: the device, the autocast dtype, the clock of the forward passes, and work
prepared ahead in threads (tokenising or image decoding overlapping the model)."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any


def pick_device(device: str | None = None) -> str:
    """`device` when given, else "cuda" when torch sees a GPU, else "cpu"."""
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_dtype(on_cuda: bool) -> Any:
    """The reduced precision of CUDA autocast: bf16, or fp16 where bf16 is missing (autocast is off on the CPU)."""
    import torch

    return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16


class ForwardClock:
    """Seconds spent in forward passes, synchronised on CUDA so that kernels still queued are counted."""

    def __init__(self, on_cuda: bool) -> None:
        self.on_cuda = on_cuda
        self.seconds = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        import torch

        if self.on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.on_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start


def threads_ahead(on_cuda: bool) -> int:
    """Threads decoding and resizing image batches ahead of the model (0: inline). Beside a GPU up to four, where
    decoding would otherwise bound the job; on the CPU one only when torch leaves a core free: when torch's threads
    take every core, a decoding thread slowed the forward passes by 5-14% (benchmarks/RESULTS.md, image_decode).
    Texts are tokenised ahead in one thread at most, and by default only beside a GPU (see extract_features)."""
    import torch

    cores = os.cpu_count() or 1
    if on_cuda:
        return max(1, min(4, cores - 1))
    return 1 if torch.get_num_threads() < cores else 0


def prepared_in_order(prepare: Callable[[Any], Any], items: list[Any], ahead: int) -> Iterator[Any]:
    """prepare(item) for each item, in order, computed in `ahead` threads up to `ahead` items before they are
    consumed (Pillow's decoders and resampling and numpy release the GIL); ahead=0 prepares each item when it is
    consumed. Closing the generator cancels what has not started; an exception in prepare is raised where its item
    is consumed."""
    if ahead <= 0:
        yield from (prepare(item) for item in items)
        return
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: deque[Future[Any]] = deque(pool.submit(prepare, item) for item in items[:ahead])
        try:
            for index in range(len(items)):
                result = pending.popleft().result()
                if index + ahead < len(items):
                    pending.append(pool.submit(prepare, items[index + ahead]))
                yield result
        finally:
            for future in pending:
                future.cancel()
