"""The compiled-graph cache folder of the OpenVINO runtime: where it is, its size cap, trimming.

A light module (no numpy, no OpenVINO): the program reads it while starting (:mod:`.prefetch`).
"""
from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

__all__ = ["CACHE_MAX_BYTES", "MAX_SEEN", "STALE_TMP_S", "cache_base", "cache_dir", "cache_max_bytes", "trim_cache"]

#: markers of tile geometries seen once kept in the cache folder (see OVModel.body_kind)
MAX_SEEN = 4096
#: default size cap of the compiled-graph cache (see cache_max_bytes)
CACHE_MAX_BYTES = 2 << 30
#: a temporary file (``<name>.<pid>.tmp``) older than this is a leftover of a killed process (see trim_cache)
STALE_TMP_S = 3600


def cache_base() -> Path | None:
    """cadyq's cache folder: ``$CADYQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/cadyq``, else ``~/.cache/cadyq`` (None
    when no home folder can be found)."""
    if os.environ.get("CADYQ_CACHE_DIR"):
        return Path(os.environ["CADYQ_CACHE_DIR"])
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cadyq"
    except RuntimeError:  # Path.home() without HOME or a passwd entry
        return None


def cache_dir() -> Path | None:
    """Folder of exported compiled graphs (None when no home folder can be found: no cache)."""
    base = cache_base()
    return None if base is None else base / "openvino"


def cache_max_bytes() -> int:
    """Size cap of the compiled-graph cache: ``$CADYQ_CACHE_MAX_MB`` (default 2048 MB; 0: no cap)."""
    raw = os.environ.get("CADYQ_CACHE_MAX_MB", "")
    try:
        return max(0, int(float(raw) * (1 << 20))) if raw.strip() else CACHE_MAX_BYTES
    except ValueError:
        return CACHE_MAX_BYTES


def trim_cache(folder: Path, max_bytes: int, keep: Path | None = None) -> None:
    """Delete the least recently used ``*.blob`` files of ``folder`` until they take at most ``max_bytes``
    (0: no cap); ``keep`` is never deleted. A tile geometry that recurs gets its own compiled graph (5-17 MB),
    so a folder of images of many sizes would otherwise fill the disk. Markers of geometries seen once
    (``*.seen``, empty) are kept for the MAX_SEEN most recent; temporary files of writes that a killed
    process left (``*.tmp`` older than STALE_TMP_S) are deleted."""
    import time

    for f in folder.glob("*.tmp"):
        with suppress(OSError):
            if time.time() - f.stat().st_mtime > STALE_TMP_S:
                f.unlink()
    marks = []
    for f in folder.glob("*.seen"):
        with suppress(OSError):
            marks.append((f.stat().st_mtime, f))
    for _, f in sorted(marks, key=lambda m: m[0])[:max(0, len(marks) - MAX_SEEN)]:
        with suppress(OSError):
            f.unlink()
    if max_bytes <= 0:
        return
    blobs = []
    for f in folder.glob("*.blob"):
        with suppress(OSError):
            st = f.stat()
            blobs.append((st.st_mtime, st.st_size, f))
    total = sum(b[1] for b in blobs)
    for _, size, f in sorted(blobs, key=lambda b: b[0]):
        if total <= max_bytes:
            break
        if keep is not None and f == keep:
            continue
        with suppress(OSError):
            f.unlink()
            total -= size
