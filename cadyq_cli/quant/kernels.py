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

Requirements, checked once by :func:`int8_available`: PyTorch's ``onednn::qconv2d_pointwise``
op and a CPU with VNNI or AMX int8 (without them x86 int8 kernels saturate 16-bit intermediate
sums and are not exact). Elsewhere the float path runs, which gives the same results.
"""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # only for annotations: modules.py calls int8_conv
    from .modules import QCodes, QuantConv2d

__all__ = ["int8_available", "int8_conv", "packed_weight"]

_ZP = 128  # uint8 zero point: codes -127..127 are stored as 1..255


def _cpu_has_vnni() -> bool:
    if os.environ.get("CADYQ_INT8", "") == "0":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


@functools.lru_cache(maxsize=None)
def int8_available() -> bool:
    """True when exact int8 convolutions can run here (op present, VNNI/AMX, self-test passes)."""
    op = getattr(getattr(torch.ops, "onednn", None), "qconv2d_pointwise", None)
    if op is None or not _cpu_has_vnni():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        k = torch.randint(-127, 128, (2, 64, 6, 5), generator=g).float()
        k[0, :, :3] = 127.0  # worst case for 16-bit saturation: large codes of one sign
        m = torch.randint(-127, 128, (8, 64, 3, 3), generator=g).float()
        m[:4] = 127.0
        conv = nn.Conv2d(64, 8, 3, padding=1, bias=False)  # geometry only
        s_w = 0.5
        u = (k.abs() * 2).clamp_max(255)  # unsigned-grid codes 0..255, zero point 0
        for codes, u8, zp in ((k, _u8(k.to(torch.int8)), _ZP), (u, u.to(torch.uint8), 0)):
            out = _qconv(u8.contiguous(memory_format=torch.channels_last), 1.0, _pack(m.to(torch.int8), s_w, conv, zp),
                         conv, None, "none", zp)
            exact = torch.nn.functional.conv2d(codes.double(), m.double(), padding=1) * s_w
            if not (out.double() - exact).abs().max() <= 1e-6 * exact.abs().max():
                return False
        return True
    except Exception:  # noqa: BLE001 - any failure means: use the float path
        return False


def _pack(codes: torch.Tensor, s_w: float, conv: nn.Conv2d, zp: int = _ZP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w_scale = torch.full((conv.out_channels,), s_w, dtype=torch.float32)
    packed = torch.ops.onednn.qconv_prepack(codes, w_scale, 1.0, zp, list(conv.stride), list(conv.padding),
                                            list(conv.dilation), conv.groups, None)
    return packed, w_scale, torch.zeros(conv.out_channels, dtype=torch.int64)


def _qconv(u8: torch.Tensor, step: float, packed: tuple, conv: nn.Conv2d, bias: torch.Tensor | None,
           attr: str, zp: int = _ZP) -> torch.Tensor:
    w, w_scale, w_zp = packed
    return torch.ops.onednn.qconv2d_pointwise(
        u8, step, zp, w, w_scale, w_zp, bias, list(conv.stride), list(conv.padding), list(conv.dilation),
        conv.groups, 1.0, 0, torch.float32, attr, [], "",
    )


def packed_weight(conv: QuantConv2d, zp: int = _ZP) -> tuple:
    """The conv's 8-bit weight codes packed for oneDNN for inputs of zero point ``zp`` (cached
    until the weight changes)."""
    key = (conv.weight._version, conv.weight.data_ptr(), zp)
    cache = getattr(conv, "_int8_cache", None)
    if cache is None or cache[0] != key:
        with torch.no_grad():
            qmax = 2 ** (conv.weight_bits - 1) - 1
            m = conv.weight.detach().abs().max() + 1e-8  # the fake_quant_weight scale
            codes = torch.round(conv.weight.detach() * qmax / m).to(torch.int8)
            cache = (key, _pack(codes, float(m) / qmax, conv, zp))
        conv._int8_cache = cache
    return cache[1]


def _u8(i8: torch.Tensor) -> torch.Tensor:
    """int8 codes -> uint8 with zero point 128 (a bit flip of the sign bit); uint8 codes as they are."""
    if i8.dtype == torch.uint8:
        return i8
    return i8.view(torch.uint8).bitwise_xor(_ZP)


def int8_conv(q: QCodes, conv: QuantConv2d) -> torch.Tensor:
    """``conv`` applied to the quantized activation ``q`` with integer arithmetic (float32 out)."""
    zp = _ZP if q.signed else 0
    packed = packed_weight(conv, zp)
    bias = conv.bias.detach().float() if conv.bias is not None else None
    if q.which is None:
        return _qconv(_u8(q.i8), q.steps[0], packed, conv, bias, "none", zp)
    present = torch.unique(q.which).tolist()
    if len(present) == 1:
        return _qconv(_u8(q.i8), q.steps[present[0]], packed, conv, bias, "none", zp)
    if q.grid is None or q.which.shape[1:] == (1, 1):  # per-sample bits: group the samples
        which = q.which.reshape(-1)
        out = None
        for k in present:
            sel = (which == k).nonzero().reshape(-1)
            part = _qconv(_u8(q.i8.index_select(0, sel)), q.steps[k], packed, conv, bias, "none", zp)
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
        part = _qconv(part_u8.permute(0, 3, 1, 2), q.steps[k], packed, conv, bias if i == 0 else None, "none", zp)
        out = part if out is None else out.add_(part)
    return out
