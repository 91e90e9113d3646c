"""The process pool shared by mask validation and selection histograms: bounded, ordered, fork-started."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

# Below this many samples, starting worker processes costs more than the work they would share.
MIN_PARALLEL_SAMPLES = 64


def resolve_workers(num_workers: int | None, count: int) -> int:
    """Worker processes for ``count`` items: ``num_workers``, or up to 8 usable cores; 1 when there are few items."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(8, available) if num_workers is None else num_workers
    return workers if workers > 1 and count >= MIN_PARALLEL_SAMPLES else 1


def map_in_order(
    fn: Callable[[Any], Any],
    tasks: Iterable[Any],
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[Any]:
    """``fn`` of each task, in input order; with workers, in a process pool with two tasks per worker in flight."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    # fork on Linux: workers start at once and never re-run the caller's __main__ (spawn would, breaking scripts
    # and notebooks without a main guard); they run PIL, OpenCV and numpy, none of the parent's Python threads.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    executor = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(method), initializer=initializer, initargs=initargs
    )
    pending: deque[Future[Any]] = deque()
    try:
        for task in tasks:
            pending.append(executor.submit(fn, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
