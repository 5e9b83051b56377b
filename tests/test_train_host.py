"""Host probes of training (train/host.py): thread oversubscription warning, busy-CPU count."""
from __future__ import annotations

from pathlib import Path


def test_oversubscribed_warns_only_when_threads_exceed_free_cores(monkeypatch):
    import os

    import cadyq_cli.train.host as host

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(host, "_busy_cpus", lambda: 0.0)
    assert host.oversubscribed(cores) is None  # an idle machine: all cores are free
    monkeypatch.setattr(host, "_busy_cpus", lambda: float(cores))
    msg = host.oversubscribed(2)
    assert msg is not None and "--threads 1" in msg and "\n" not in msg
    assert host.oversubscribed(1) is None  # one thread: nothing to suggest
    monkeypatch.setattr(host, "_busy_cpus", lambda: None)
    assert host.oversubscribed(2) is None  # load unknown: no warning
    monkeypatch.setattr(os, "cpu_count", lambda: cores + 64)  # a container on a big, busy host
    monkeypatch.setattr(host, "_busy_cpus", lambda: 40.0)
    assert host.oversubscribed(cores) is None


def test_busy_cpus_reads_a_number():
    from cadyq_cli.train.host import _busy_cpus

    busy = _busy_cpus()
    if Path("/proc/stat").is_file():  # Linux: the running-thread count is always readable
        assert busy is not None and 0.0 <= busy < 10_000
    else:
        assert busy is None or busy >= 0.0
