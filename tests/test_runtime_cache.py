"""The compiled-graph cache of the OpenVINO runtime stays within its size cap (no OpenVINO needed)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cadyq_cli.runtime.engine import CACHE_MAX_BYTES, cache_max_bytes, trim_cache


def _blob(folder: Path, name: str, size: int, age: int) -> Path:
    f = folder / f"{name}.blob"
    f.write_bytes(b"x" * size)
    os.utime(f, (1_700_000_000 - age, 1_700_000_000 - age))
    return f


def test_trim_deletes_the_least_recently_used_first(tmp_path: Path) -> None:
    old, mid, new = _blob(tmp_path, "old", 400, 30), _blob(tmp_path, "mid", 400, 20), _blob(tmp_path, "new", 400, 10)
    other = tmp_path / "notes.txt"
    other.write_text("not a blob")
    trim_cache(tmp_path, 900)
    assert not old.exists() and mid.exists() and new.exists() and other.exists()
    trim_cache(tmp_path, 0)  # no cap
    assert mid.exists()
    trim_cache(tmp_path, 100, keep=mid)  # the graph just written stays even when it alone is over the cap
    assert mid.exists() and not new.exists()


def test_cap_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CADYQ_CACHE_MAX_MB", raising=False)
    assert cache_max_bytes() == CACHE_MAX_BYTES
    monkeypatch.setenv("CADYQ_CACHE_MAX_MB", "1.5")
    assert cache_max_bytes() == 3 << 19
    monkeypatch.setenv("CADYQ_CACHE_MAX_MB", "0")
    assert cache_max_bytes() == 0
    monkeypatch.setenv("CADYQ_CACHE_MAX_MB", "lots")
    assert cache_max_bytes() == CACHE_MAX_BYTES


def test_trim_deletes_what_killed_writers_left(tmp_path: Path) -> None:
    """A blob or marker write killed half-way leaves ``<name>.<pid>.tmp``: gone once it is an hour old; a
    write in progress (a fresh temporary file) is left alone."""
    import time

    stale, fresh = tmp_path / "g.blob.123.tmp", tmp_path / "last-graph.json.456.tmp"
    stale.write_bytes(b"half a graph")
    fresh.write_bytes(b"{")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    trim_cache(tmp_path, 0)
    assert not stale.exists() and fresh.exists()
