"""What the host offers training: whether bf16 autocast is faster on this CPU, and whether the
torch threads fit the cores that other work leaves free (both measured, not assumed)."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

__all__ = ["bf16_helps", "oversubscribed"]


def _own_running_threads() -> int:
    """Threads of this process in the running state (its torch worker threads count too)."""
    n = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            n += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            pass
    return max(n, 1)


def _busy_cpus() -> float | None:
    """Threads running on the machine now, besides this process's: the median of a few reads of
    ``procs_running`` in /proc/stat (the 1-minute load average, the fallback, still counts a
    pipeline's previous stage); ``None`` when neither can be read."""
    try:
        seen = []
        for i in range(7):
            with open("/proc/stat") as f:
                total = [int(ln.split()[1]) for ln in f if ln.startswith("procs_running")]
            if total:
                seen.append(total[0] - _own_running_threads())
            if i < 6:
                time.sleep(0.02)
        if seen:
            return max(0.0, float(sorted(seen)[len(seen) // 2]))
    except (OSError, ValueError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def oversubscribed(threads: int = 0) -> str | None:
    """A one-line warning when this run's torch threads exceed the cores other work leaves free.

    OpenMP threads that have to share a core wait on each other: here a 2-thread pams run beside a
    1-thread run on 2 cores made 11 steps in 6 minutes, against ~55 with 1 thread.
    ``None`` when the threads fit, for one thread (fewer cannot help), or when the load is unknown.
    """
    busy = _busy_cpus()
    if busy is None:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    host = max(cores, os.cpu_count() or cores)  # a container's busy count is the host's
    free = max(1, min(cores, host - math.floor(busy + 0.5)))
    want = threads or torch.get_num_threads()
    if want <= free:
        return None
    return (f"warning: {want} torch thread(s) on {cores} core(s) with {busy:.0f} other thread(s) running: threads "
            f"sharing a core can slow training several-fold (--threads {free} may be faster)")


def bf16_helps(threads: int = 0) -> bool:
    """Whether bf16 autocast speeds up training on this CPU, measured: one 64->64 3x3 conv
    forward + backward on a batch of training-sized maps, fp32 against bf16 (about a second).

    On CPUs with native bf16 (AVX-512 BF16, AMX) autocast was ~2.8x faster here; on an AVX2-only
    CPU it was 15x slower (emulated), so a fixed default would be wrong on one of them.
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        conv = torch.nn.Conv2d(64, 64, 3, padding=1)
        x = torch.randn(8, 64, 48, 48, requires_grad=True)

        def run(bf16: bool) -> float:
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = conv(x)
                y.float().sum().backward()
                best = min(best, time.perf_counter() - t)
            return best

        return run(True) < 0.8 * run(False)
    finally:
        torch.set_num_threads(old)
