"""Shared timing for the benchmarks: interleaved repetitions, medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(variants: dict[str, Callable[[], object]], reps: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run every variant once per repetition, in turn; return (all times, medians) in seconds."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times, {k: statistics.median(v) for k, v in times.items()}
