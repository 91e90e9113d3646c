"""The process pool shared by mask validation and selection histograms: bounded, ordered, fork-started, never orphaned.

Also the defaults for small machines: worker counts from the CPU affinity, one OpenCV thread per DataLoader worker.

A worker must never outlive the process that started it: killed parents (SIGKILL included) take their workers with
them through Linux's parent-death signal, and SIGINT/SIGTERM of the parent kill the pool's workers before acting as
they did before the pool started. (The parent-death signal fires when the thread that forked the workers ends: the
thread iterating `map_in_order`, which shuts its pool down before it returns.)
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from types import FrameType
from typing import Any

# Below this many samples, starting worker processes costs more than the work they would share.
MIN_PARALLEL_SAMPLES = 64
# Default process count at most: past 8, decoding 1080p maps is bound by the disk and the parent collecting results.
MAX_DEFAULT_WORKERS = 8
# <linux/prctl.h>: deliver a signal to this process when the thread that forked it exits.
PR_SET_PDEATHSIG = 1
# The signals after which the parent shuts its pool down.
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_workers(num_workers: int | None, count: int) -> int:
    """Worker processes for ``count`` items: ``num_workers``, or up to 8 usable cores; 1 when there are few items."""
    workers = min(MAX_DEFAULT_WORKERS, usable_cores()) if num_workers is None else num_workers
    return workers if workers > 1 and count >= MIN_PARALLEL_SAMPLES else 1


def default_loader_workers() -> int:
    """DataLoader workers per process: this node's usable cores shared by its processes (LOCAL_WORLD_SIZE), at most 8.

    At least 1, so decoding and augmenting 1080p frames never runs in the training loop's own process.
    """
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cores() // processes))


def limit_loader_threads(num_workers: int) -> None:
    """One OpenCV thread per DataLoader worker (torch's DataLoader already sets one torch thread per worker).

    Call before the workers fork: with OpenCV's own thread pool in every worker, N workers would run N x cores
    threads on the same cores (on a 2-core Colab or Kaggle machine, slower than N single threads).
    """
    if num_workers > 0:
        import cv2
        cv2.setNumThreads(1)


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """Worker initializer: die with the parent, leave interruption to the parent, then the caller's initializer."""
    if sys.platform.startswith("linux"):
        # SIGKILL when the parent dies, however it dies: an orphaned worker would block on the task queue forever.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    # Forked workers inherit the parent's Python handlers; Ctrl-C reaches the whole foreground group, and the parent
    # alone decides what it means (it kills the workers), so workers ignore it instead of printing tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if initializer is not None:
        initializer(*initargs)


def _kill_workers(executor: ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor has no public way to stop running tasks before Python 3.14 (terminate_workers).
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        process.kill()


class _ShutdownOnSignals:
    """While a pool runs in the main thread, SIGINT/SIGTERM kill its workers, then do what they did before."""

    def __init__(self, executor: ProcessPoolExecutor) -> None:
        self.executor = executor
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _ShutdownOnSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in SHUTDOWN_SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN and previous is not None:  # an ignored signal stays ignored
                    self.previous[signum] = previous
                    signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        _kill_workers(self.executor)
        previous = self.previous.pop(signum)
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)  # e.g. SIGINT's default handler raises KeyboardInterrupt
        else:
            os.kill(os.getpid(), signum)  # SIG_DFL: end the process as the signal would have

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous.clear()


def map_in_order(
    fn: Callable[[Any], Any],
    tasks: Iterable[Any],
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[Any]:
    """``fn`` of each task, in input order; with workers, in a process pool with two tasks per worker in flight.

    Workers die with this process (any signal, SIGKILL included); SIGINT or SIGTERM while the pool runs kill the
    workers first. Close the iterator (``contextlib.closing``) when abandoning it early.
    """
    if workers <= 1:
        yield from map(fn, tasks)
        return
    # fork on Linux: workers start at once and never re-run the caller's __main__ (spawn would, breaking scripts
    # and notebooks without a main guard); they run PIL, OpenCV and numpy, none of the parent's Python threads.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    executor = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker,
        initargs=(os.getpid(), initializer, initargs),
    )
    pending: deque[Future[Any]] = deque()
    try:
        with _ShutdownOnSignals(executor):
            for task in tasks:
                pending.append(executor.submit(fn, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    except BaseException:
        # Interrupted or failed: running tasks are not worth waiting for.
        _kill_workers(executor)
        raise
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
