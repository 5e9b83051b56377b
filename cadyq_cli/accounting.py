"""Cost accounting without PyTorch: BitOPs and FAB from a cost table, and the tables of EDSR-baseline and CARN
(the networks of the OpenVINO runtime) by formula.

Definitions (the report's and the README's; :mod:`cadyq_cli.quant.cost` measures a model's table with a
probe forward, this module states EDSR-baseline's and CARN's from their shapes, and tests hold them equal):

* **MACs** of a convolution: ``C_out * C_in / groups * k_h * k_w * H_out * W_out``.
* **BitOPs** = sum over convolutions of ``MACs x weight bits x activation bits``; quantized convs have
  8-bit weights and the bits of the selector feeding them, full-precision layers count 32 x 32.
* **FAB** = mean of the bits chosen by the selectors of a region; an image's FAB is the unweighted mean
  over its regions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["ConvCost", "bitops", "fab", "edsr_cost_table", "carn_cost_table"]


@dataclass(frozen=True)
class ConvCost:
    """One convolution of the model.

    Attributes:
        name: module name in the state dict.
        macs_per_px: MACs per LR input pixel.
        weight_bits: 8 for quantized convs, 32 otherwise.
        act_selector: index of the bit selector feeding this conv, or None.
        act_bits: fixed activation bits when ``act_selector`` is None (8 or 32).
        feeder: name of the quantizer module whose output is this conv's input, or None.
    """

    name: str
    macs_per_px: float
    weight_bits: int
    act_selector: int | None
    act_bits: int
    feeder: str | None = None


def bitops(table: list[ConvCost], region_px: object, region_bits: object | None, fixed_bits: int | None = None) -> float:
    """BitOPs of one forward.

    Args:
        table: the model's convolutions.
        region_px: (R,) pixels of each region (LR), array-like.
        region_bits: (R, n_selectors) bits chosen per region, array-like, or None.
        fixed_bits: when given, every selector uses these bits (``w8aK``); ``32`` together with
            ``region_bits=None`` means the FP32 model (all convs 32 x 32).
    """
    px = np.asarray(region_px, dtype=np.float64)
    n_px = float(px.sum())
    rb = None if region_bits is None else np.asarray(region_bits, dtype=np.float64)
    total = 0.0
    for c in table:
        if fixed_bits == 32:
            total += c.macs_per_px * n_px * 32 * 32
        elif c.act_selector is not None:
            ab = float((rb[:, c.act_selector] * px).sum()) if rb is not None else float(fixed_bits or 8) * n_px
            total += c.macs_per_px * c.weight_bits * ab
        else:
            total += c.macs_per_px * c.weight_bits * c.act_bits * n_px
    return total


def fab(region_bits: object) -> float:
    """FAB: unweighted mean over regions of the mean selector bits; (R, n_sel) in."""
    rb = np.asarray(region_bits, dtype=np.float64)
    if rb.size == 0:
        return 32.0
    return float(rb.mean(axis=1).mean())


def _upsampler(scale: int, f: int, name: Callable[[int], str]) -> list[ConvCost]:
    """The upsampler's FP convs (the ``j``-th named ``name(j)``): one 3x3 conv to ``9 f`` channels at x3, else one
    to ``4 f`` per factor 2, each on the previous one's pixel-shuffled output."""
    if scale == 3:
        return [ConvCost(name(0), float(9 * f * f * 9), 32, None, 32)]
    return [ConvCost(name(j), float(4 * f * f * 9 * 4**j), 32, None, 32) for j in range(scale // 2)]


def edsr_cost_table(scale: int, n_blocks: int = 16, n_feats: int = 64) -> list[ConvCost]:
    """EDSR-baseline's convolutions in forward order (what :func:`cadyq_cli.quant.cost.cost_table` measures)."""
    k = 9
    f = n_feats
    rows = [ConvCost("head.0", float(3 * f * k), 32, None, 32)]
    for i in range(n_blocks):
        rows.append(ConvCost(f"body.{i}.body.0", float(f * f * k), 8, 2 * i, 8, f"body.{i}.bitsel1"))
        rows.append(ConvCost(f"body.{i}.body.3", float(f * f * k), 8, 2 * i + 1, 8, f"body.{i}.body.2"))
    rows.append(ConvCost(f"body.{n_blocks}", float(f * f * k), 32, None, 32))
    rows += _upsampler(scale, f, lambda j: f"tail.0.{2 * j}")
    rows.append(ConvCost("tail.1", float(3 * f * k * scale * scale), 32, None, 32))
    return rows


def carn_cost_table(scale: int, n_feats: int = 64) -> list[ConvCost]:
    """CARN's convolutions in forward order at ``scale`` (what :func:`cadyq_cli.quant.cost.cost_table` measures of
    :class:`cadyq_cli.models.carn.CARN`): entry, per block the units' two quantized 3x3 convs then the block's
    1x1 fusion conv after each unit, the outer 1x1 fusion after each block, the scale's upsampler, exit."""
    f, k = n_feats, 9
    rows = [ConvCost("entry", float(3 * f * k), 32, None, 32)]
    sel = 0
    for b in (1, 2, 3):
        for u in (1, 2, 3):
            p = f"b{b}.b{u}.body"
            rows.append(ConvCost(f"{p}.1", float(f * f * k), 8, sel, 8, f"{p}.0"))
            rows.append(ConvCost(f"{p}.4", float(f * f * k), 8, sel + 1, 8, f"{p}.3"))
            rows.append(ConvCost(f"b{b}.c{u}.body.0", float((u + 1) * f * f), 32, None, 32))
            sel += 2
        rows.append(ConvCost(f"c{b}.body.0", float((b + 1) * f * f), 32, None, 32))
    rows += _upsampler(scale, f, lambda j: f"upsample.up{scale}.body.{3 * j}")
    rows.append(ConvCost("exit", float(3 * f * k * scale * scale), 32, None, 32))
    return rows
