"""The compute dial: a bit bias that moves every selector towards fewer or more bits, and the
per-image search for the bias that meets a FAB target.

The bias ``B`` is added to each selector's 4-bit logit and subtracted from its 8-bit logit
(:meth:`~cadyq_cli.models._base.SRModel.set_bit_bias`), so as ``B`` rises every decision can
only move down (8 → 6 → 4) and the image's FAB falls; ``B = 0`` is the model as trained.
A FAB target is met by probing biases with bits-only forwards (the body runs, the upsampling
tail does not): first ``B = 0``, then steps that grow fourfold until the target is crossed,
then interpolation inside the bracket (false position, kept off its ends), at most
``max_probes`` probes, and one real forward with the best bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .engine import TilingConfig, upscale_array
from .report import ImageReport
from .models._base import SRModel

__all__ = ["BiasFit", "fit_bit_bias", "upscale_to_fab"]


@dataclass(frozen=True)
class BiasFit:
    """The outcome of a FAB search: the chosen bias, the FAB it gives, the probes it took."""

    bias: float
    fab: float
    probes: int


def fit_bit_bias(model: SRModel, rgb: np.ndarray, cfg: TilingConfig, target: float, tol: float = 0.1,
                 max_probes: int = 12) -> BiasFit:
    """The bias whose FAB on ``rgb`` is closest to ``target`` (within ``tol`` stops early).

    Raises:
        ValueError: the model is not in dynamic mode, or the target is outside [4, 8].
    """
    if not model.mode.dynamic:
        raise ValueError("a FAB target needs the dynamic mode")
    if not 4.0 <= target <= 8.0:
        raise ValueError(f"the FAB target must be between 4 and 8, not {target}")
    old = model.bit_bias
    tried: dict[float, float] = {}

    def probe(bias: float) -> float:
        model.set_bit_bias(bias)
        tried[bias] = upscale_array(model, rgb, cfg, bits_only=True)[1].fab
        return tried[bias]

    try:
        f = probe(0.0)
        sign = 1.0 if f > target else -1.0  # the direction that brings FAB towards the target
        lo, hi, step = 0.0, None, 1.0
        while abs(f - target) > tol and hi is None and len(tried) < max_probes:
            before = f
            f = probe(sign * step)
            if (f - target) * sign <= 0:
                hi = sign * step
            elif f == before and step >= 16:  # every selector already at the end of the dial: out of reach
                break
            else:
                lo, step = sign * step, step * 4
        while hi is not None and abs(f - target) > tol and len(tried) < max_probes:
            f_lo, f_hi = tried[lo], tried[hi]
            t = (f_lo - target) / (f_lo - f_hi) if f_lo != f_hi else 0.5
            mid = lo + (hi - lo) * min(max(t, 0.2), 0.8)
            f = probe(mid)
            lo, hi = (mid, hi) if (f - target) * sign > 0 else (lo, mid)
    finally:
        model.set_bit_bias(old)
    best = min(tried, key=lambda b: (abs(tried[b] - target), abs(b)))
    return BiasFit(best, tried[best], len(tried))


def upscale_to_fab(model: SRModel, rgb: np.ndarray, cfg: TilingConfig, target: float,
                   progress: Callable[[int, int], None] | None = None,
                   out_dtype: str = "float32") -> tuple[np.ndarray, ImageReport]:
    """:func:`~cadyq_cli.engine.upscale_array` with the bias fitted to ``target`` for this image;
    the report records the target, the bias and the probes. The model's own bias is restored."""
    fit = fit_bit_bias(model, rgb, cfg, target)
    old = model.bit_bias
    model.set_bit_bias(fit.bias)
    try:
        sr, report = upscale_array(model, rgb, cfg, progress, out_dtype=out_dtype)
    finally:
        model.set_bit_bias(old)
    report.target_fab = target
    report.probes = fit.probes
    return sr, report  # type: ignore[return-value]
