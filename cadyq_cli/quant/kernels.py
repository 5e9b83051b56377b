"""Integer kernels: quantized convolutions run on the integer codes (oneDNN int8, exact int32 sums).

A CADyQ activation is ``k * step`` with an integer code ``|k| <= 127`` and a step ``alpha / qmax``
that depends on the bit-width chosen for the sample or region; an 8-bit weight is ``m * s_w``.
So a quantized conv is ``s_x * s_w * sum(k * m) + bias``: with ``k`` stored as uint8
(zero point 128) and ``m`` as int8, oneDNN sums the products exactly in int32 and rescales once
to float32. Codes of the unsigned grid (ReLU inputs, ``0..255``) are uint8 already and run with
zero point 0. The result equals the fake-quantized float conv up to float32 rounding (it is in
fact closer to the exact value, see ``tests/test_intconv.py``), at a fraction of the cost.

Where a tile mixes bit-widths (per-sample bits in a batch, or per-region bits inside one tile),
the input is split by bit-width: each part runs with its own step and the outputs are summed
(a conv is linear; the parts are exact, so the sum is too). Samples of one batch are grouped
instead of masked.

The op takes tensors (codes, packed weight codes, bias, conv geometry), not modules: the modules
(:mod:`cadyq_cli.quant.modules`) produce the codes and own their packed weights.

Requirements, checked once by :func:`int8_available`: PyTorch's ``onednn::qconv2d_pointwise``
op and a CPU with VNNI or AMX int8 (without them x86 int8 kernels saturate 16-bit intermediate
sums and are not exact). Elsewhere the float path runs, which gives the same results.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..devices import cpu_has_int8_dot
from .regions import RegionGrid

__all__ = ["QCodes", "ConvGeometry", "conv_geometry", "int8_available", "pack_weight", "qconv2d"]

_ZP = 128  # uint8 zero point: codes -127..127 are stored as 1..255


@dataclass
class QCodes:
    """Integer codes of a quantized activation, attached to its float tensor as ``_cadyq_codes``
    for :func:`qconv2d`.

    Attributes:
        i8: the codes, channels-last (N, C, H, W): int8 on the signed grid (-127..127), uint8
            on the unsigned grid (0..255).
        steps: float step (``alpha / qmax``) of each candidate bit-width.
        which: None when the whole tensor uses ``steps[0]``; else (N, nh, nw) int64 indices
            into ``steps`` per sample and region.
        grid: the region grid of ``which`` (None: one region per sample).
    """

    i8: torch.Tensor
    steps: list[float]
    which: torch.Tensor | None = None
    grid: RegionGrid | None = None

    @property
    def signed(self) -> bool:
        """True for int8 codes (signed grid), False for uint8 codes (unsigned grid)."""
        return self.i8.dtype == torch.int8

    @property
    def zero_point(self) -> int:
        """Zero point of the uint8 codes the kernel reads: 128 for signed codes, 0 for unsigned ones."""
        return _ZP if self.signed else 0


class ConvGeometry(NamedTuple):
    """What a convolution kernel needs to know of a conv besides its weight."""

    out_channels: int
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


def conv_geometry(conv: nn.Conv2d) -> ConvGeometry:
    """The :class:`ConvGeometry` of a ``Conv2d``."""
    return ConvGeometry(conv.out_channels, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)


@functools.lru_cache(maxsize=None)
def int8_available() -> bool:
    """True when exact int8 convolutions can run here (op present, VNNI/AMX, self-test passes)."""
    op = getattr(getattr(torch.ops, "onednn", None), "qconv2d_pointwise", None)
    if op is None or not cpu_has_int8_dot():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        k = torch.randint(-127, 128, (2, 64, 6, 5), generator=g).float()
        k[0, :, :3] = 127.0  # worst case for 16-bit saturation: large codes of one sign
        m = torch.randint(-127, 128, (8, 64, 3, 3), generator=g).float()
        m[:4] = 127.0
        geo = ConvGeometry(8, [1, 1], [1, 1], [1, 1], 1)
        s_w = 0.5
        u = (k.abs() * 2).clamp_max(255)  # unsigned-grid codes 0..255, zero point 0
        for codes, u8, zp in ((k, _u8(k.to(torch.int8)), _ZP), (u, u.to(torch.uint8), 0)):
            out = _qconv(u8.contiguous(memory_format=torch.channels_last), 1.0, pack_weight(m.to(torch.int8), s_w, geo, zp),
                         geo, None, zp)
            exact = torch.nn.functional.conv2d(codes.double(), m.double(), padding=1) * s_w
            if not (out.double() - exact).abs().max() <= 1e-6 * exact.abs().max():
                return False
        return True
    except Exception:  # noqa: BLE001 - any failure means: use the float path
        return False


@dataclass(frozen=True)
class PackedWeight:
    """8-bit weight codes packed by oneDNN for inputs of one zero point, with their scale."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero_points: torch.Tensor


def pack_weight(codes: torch.Tensor, scale: float, geometry: ConvGeometry, zp: int = _ZP) -> PackedWeight:
    """Pack int8 weight ``codes`` (scale ``scale``) for inputs of zero point ``zp``."""
    w_scale = torch.full((geometry.out_channels,), scale, dtype=torch.float32)
    packed = torch.ops.onednn.qconv_prepack(codes, w_scale, 1.0, zp, geometry.stride, geometry.padding,
                                            geometry.dilation, geometry.groups, None)
    return PackedWeight(packed, w_scale, torch.zeros(geometry.out_channels, dtype=torch.int64))


def _qconv(u8: torch.Tensor, step: float, w: PackedWeight, geometry: ConvGeometry, bias: torch.Tensor | None,
           zp: int = _ZP) -> torch.Tensor:
    return torch.ops.onednn.qconv2d_pointwise(
        u8, step, zp, w.packed, w.scale, w.zero_points, bias, geometry.stride, geometry.padding, geometry.dilation,
        geometry.groups, 1.0, 0, torch.float32, "none", [], "",
    )


def _u8(i8: torch.Tensor) -> torch.Tensor:
    """int8 codes -> uint8 with zero point 128 (a bit flip of the sign bit); uint8 codes as they are."""
    if i8.dtype == torch.uint8:
        return i8
    return i8.view(torch.uint8).bitwise_xor(_ZP)


def qconv2d(q: QCodes, weight: PackedWeight, bias: torch.Tensor | None, geometry: ConvGeometry) -> torch.Tensor:
    """The convolution of the quantized activation ``q`` with integer arithmetic (float32 out).

    ``weight`` must be packed for ``q.zero_point``.
    """
    zp = q.zero_point
    if q.which is None:
        return _qconv(_u8(q.i8), q.steps[0], weight, geometry, bias, zp)
    present = torch.unique(q.which).tolist()
    if len(present) == 1:
        return _qconv(_u8(q.i8), q.steps[present[0]], weight, geometry, bias, zp)
    if q.grid is None or q.which.shape[1:] == (1, 1):  # per-sample bits: group the samples
        which = q.which.reshape(-1)
        out = None
        for k in present:
            sel = (which == k).nonzero().reshape(-1)
            part = _qconv(_u8(q.i8.index_select(0, sel)), q.steps[k], weight, geometry, bias, zp)
            if out is None:
                out = part.new_empty((q.i8.shape[0], *part.shape[1:])).contiguous(memory_format=torch.channels_last)
            out.index_copy_(0, sel, part)
        return out
    # per-region bits: one pass per bit-width over the codes of its regions (others = code 0)
    nhwc = q.i8.permute(0, 2, 3, 1)  # i8 is channels-last: a contiguous NHWC view
    out = None
    for i, k in enumerate(present):
        mask = q.grid.expand(q.which == k).unsqueeze(-1).to(q.i8.dtype)  # (N, H, W, 1)
        part_u8 = nhwc * mask  # code 0 (value 0) outside the regions of this bit-width
        if q.signed:
            part_u8 = part_u8.view(torch.uint8).bitwise_xor_(_ZP)
        part = _qconv(part_u8.permute(0, 3, 1, 2), q.steps[k], weight, geometry, bias if i == 0 else None, zp)
        out = part if out is None else out.add_(part)
    return out
