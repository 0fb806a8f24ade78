"""The one benchmark timer: seconds per call after warm-up calls, as a mean or a median over repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def time_calls(fn: Callable[[int], Any], iters: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `iters` calls fn(i), after `warmup` untimed calls (allocations, kernel choice)."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(iters):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return times


def mean_seconds(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Mean seconds per call."""
    return sum(time_calls(lambda _i: fn(), iters, warmup)) / iters


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds per call: robust to a stray slow call on a shared machine."""
    return statistics.median(time_calls(lambda _i: fn(), repeats, warmup))
