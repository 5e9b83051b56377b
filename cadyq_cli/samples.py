"""Float samples to integer ones: clamp, round half to even, NaN as 0 — shared by image writing
(:mod:`cadyq_cli.io`) and the OpenVINO engine's tile placement (:mod:`cadyq_cli.runtime.engine`).

Works through blocks of rows and one small float32 buffer, so a large image needs no full-size
float temporaries (``python bench/startup.py place``).
"""
from __future__ import annotations

import numpy as np

__all__ = ["round_into"]

#: float32 elements per block (256 KB): the buffer stays in cache
_BLOCK = 1 << 16


def round_into(src: np.ndarray, dst: np.ndarray, top: float, scale: float = 1.0) -> np.ndarray:
    """Write ``src * scale`` clamped to [0, ``top``] and rounded half to even into the integer array
    ``dst`` (same shape; the first axis is rows; either may be a strided view). NaN becomes 0, +inf
    ``top``, -inf 0. Returns ``dst``."""
    if src.shape != dst.shape:
        raise ValueError(f"round_into: shapes differ, {src.shape} and {dst.shape}")
    if not src.size:
        return dst
    rows = max(1, _BLOCK // max(1, src[0].size))
    buf = np.empty((min(rows, src.shape[0]),) + src.shape[1:], np.float32)
    for y in range(0, src.shape[0], rows):
        t = buf[: min(rows, src.shape[0] - y)]
        if scale == 1.0:
            np.fmax(src[y : y + rows], 0, out=t, casting="same_kind")  # fmax/fmin take NaN to the bound: NaN -> 0
        else:
            np.multiply(src[y : y + rows], np.float32(scale), out=t, dtype=np.float32, casting="same_kind")
            np.fmax(t, 0, out=t)
        np.fmin(t, top, out=t)
        np.rint(t, out=t)
        dst[y : y + rows] = t
    return dst
