"""The one timer of the benchmarks (an optional warm-up, repeated timed passes, their median, min and max), and
the process memory readings they share."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def cpu_seconds() -> float:
    """User and system CPU seconds of this process and its finished children (worker pools included)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def resident_mb() -> float:
    """Current resident memory of this process in MiB (Linux), else the peak so far."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return peak_mb()


def peak_mb() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


@dataclass
class Timing:
    """Wall and CPU seconds of each timed pass (warm-up excluded), the warm-up's wall seconds, the last result."""

    wall_s: list[float]
    cpu_s: list[float]
    result: Any
    warmup_s: float | None = None

    @property
    def median(self) -> float:
        """Median wall seconds of the timed passes."""
        return statistics.median(self.wall_s)

    @property
    def min(self) -> float:
        """Wall seconds of the fastest pass."""
        return min(self.wall_s)

    @property
    def max(self) -> float:
        """Wall seconds of the slowest pass."""
        return max(self.wall_s)

    @property
    def cpu_of_fastest(self) -> float:
        """CPU seconds of the fastest pass."""
        return self.cpu_s[self.wall_s.index(self.min)]


def time_passes(
    run: Callable[[], Any],
    repeats: int,
    warmup: Callable[[], Any] | None = None,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Call ``warmup`` once (if given), then time ``repeats`` calls of ``run``, each after an untimed ``setup``."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    warmup_s = None
    if warmup is not None:
        start = time.perf_counter()
        warmup()
        warmup_s = time.perf_counter() - start
    wall_s, cpu_s, result = [], [], None
    for _ in range(repeats):
        if setup is not None:
            setup()
        start, cpu_start = time.perf_counter(), cpu_seconds()
        result = run()
        wall_s.append(time.perf_counter() - start)
        cpu_s.append(cpu_seconds() - cpu_start)
    return Timing(wall_s, cpu_s, result, warmup_s)
