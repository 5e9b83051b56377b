"""Quantized building blocks: 8-bit weight conv, PAMS activation quantizer, CADyQ bit selector.

Parameter and buffer names match the official checkpoints (``alpha``, ``max_val``,
``quant_bit{1,2,3}``, ``net_small.0``) so a state dict loads without renaming.

Region bit maps: a :class:`RegionGrid` splits the spatial plane of a tile into regions
(rows ``row_idx``, columns ``col_idx``). A selector then computes its features (mean
image-gradient magnitude, per-channel std of its input) per region, picks bits per region,
and quantizes with a per-pixel step map. With no grid (or one region covering the whole
input) it is exactly the per-patch CADyQ selector of the paper.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import int8_conv
from .modes import CANDIDATE_BITS, MODES, QuantMode
from .primitives import act_codes, fake_quant_act, fake_quant_weight, qmax_for_bits

__all__ = [
    "RegionGrid", "QuantContext", "QuantConv2d", "InputConv2d", "ActQuantizer", "BitSelector", "region_mean", "conv_forward",
]


@dataclass
class RegionGrid:
    """A partition of an H x W plane into rectangular regions.

    Attributes:
        row_idx: (H,) int64, region-row index of each pixel row, non-decreasing from 0.
        col_idx: (W,) int64, region-column index of each pixel column.
    """

    row_idx: torch.Tensor
    col_idx: torch.Tensor
    #: per-grid constants reused by every selector of a forward (one-hot matrices, counts)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_bounds(cls, row_bounds: list[int], col_bounds: list[int], device: torch.device | str = "cpu") -> RegionGrid:
        """Build a grid from region edges, e.g. ``[0, 96, 192, 250]`` (first 0, last = size)."""

        def idx(bounds: list[int]) -> torch.Tensor:
            sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))

        return cls(idx(row_bounds), idx(col_bounds))

    @classmethod
    def uniform(cls, h: int, w: int, region: int, device: torch.device | str = "cpu") -> RegionGrid:
        """Regions of ``region`` x ``region`` pixels from the top-left corner (ragged last row/column)."""
        rows = list(range(0, h, region)) + [h]
        cols = list(range(0, w, region)) + [w]
        return cls.from_bounds(rows, cols, device)

    @property
    def shape(self) -> tuple[int, int]:
        """(number of region rows, number of region columns)."""
        return int(self.row_idx[-1]) + 1, int(self.col_idx[-1]) + 1

    def onehots(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(nh, H) and (nw, W) 0/1 matrices that sum pixels into regions (built once per grid)."""
        key = ("onehots", dtype)
        if key not in self._cache:
            nh, nw = self.shape
            self._cache[key] = (F.one_hot(self.row_idx, nh).T.to(dtype), F.one_hot(self.col_idx, nw).T.to(dtype))
        return self._cache[key]  # type: ignore[return-value]

    def counts(self) -> torch.Tensor:
        """(nh, nw) float, number of pixels in each region (computed once per grid)."""
        if "counts" not in self._cache:
            nh, nw = self.shape
            ch = torch.bincount(self.row_idx, minlength=nh).float()
            cw = torch.bincount(self.col_idx, minlength=nw).float()
            self._cache["counts"] = ch[:, None] * cw[None, :]
        return self._cache["counts"]  # type: ignore[return-value]

    def expand(self, m: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-region map (..., nh, nw) to pixels (..., H, W)."""
        return m[..., self.row_idx, :][..., self.col_idx]

    def pooling(self) -> tuple[int, int, int, int] | None:
        """(size_h, size_w, pad_top, pad_left) when the grid is a regular lattice cut anywhere
        (interior regions equal, first and last ones possibly smaller), else None.

        Then a region sum is a sum pooling of the input padded by (pad_top, pad_left) zeros.
        """
        if "pooling" not in self._cache:
            geo = []
            for idx in (self.row_idx, self.col_idx):
                sizes = torch.bincount(idx).tolist()
                size = sizes[1] if len(sizes) > 2 else max(sizes)
                if any(v != size for v in sizes[1:-1]) or sizes[0] > size or sizes[-1] > size:
                    geo = None
                    break
                geo.append((size, size - sizes[0]))
            self._cache["pooling"] = None if geo is None else (geo[0][0], geo[1][0], geo[0][1], geo[1][1])
        return self._cache["pooling"]


def region_sum(x: torch.Tensor, grid: RegionGrid) -> torch.Tensor:
    """Sum of x (N, C, H, W) over each region of ``grid``: (N, C, nh, nw)."""
    geo = grid.pooling()
    if geo is None:
        oh, ow = grid.onehots(x.dtype)
        return torch.einsum("nchw,ah,bw->ncab", x, oh, ow)
    kh, kw, pt, pl = geo
    if pt or pl:
        x = F.pad(x, (pl, 0, pt, 0))
    return F.avg_pool2d(x, (kh, kw), (kh, kw), ceil_mode=True, divisor_override=1)


def region_mean(x: torch.Tensor, grid: RegionGrid | None) -> torch.Tensor:
    """Mean of x (N, C, H, W) over each region: (N, C, nh, nw), or (N, C, 1, 1) without a grid."""
    if grid is None:
        return x.mean(dim=(2, 3), keepdim=True)
    return region_sum(x, grid) / grid.counts().to(x.dtype)


def _std_from_sums(s1: torch.Tensor, s2: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """Unbiased std from the sum and the sum of squares of n values."""
    return torch.sqrt(((s2 - s1 * s1 / n) / (n - 1)).clamp_min(0))


def region_std(x: torch.Tensor, grid: RegionGrid | None) -> torch.Tensor:
    """Unbiased per-channel std of x (N, C, H, W) over each region: (N, C, nh, nw).

    A region of a single pixel has no defined std (the official code yields NaN there and the
    selector's choice becomes arbitrary); we deliberately return 0 instead.
    """
    if grid is None:
        # one pass (sum and sum of squares), 1.6x faster than torch.std; relative difference
        # to torch.std ~1e-6, which only matters for exact logit ties
        n, c, h, w = x.shape
        v = x.reshape(n, c, h * w)
        s1 = v.sum(-1)
        s2 = torch.linalg.vector_norm(v, dim=-1).square()  # far faster than a dot/einsum here
        s = _std_from_sums(s1, s2, h * w).reshape(n, c, 1, 1)
    elif grid.pooling() is not None:
        # one pass with sum pooling (a regular grid; the engine's grids always are)
        cnt = grid.counts().to(x.dtype)
        s1 = region_sum(x, grid)
        s2 = region_sum(x * x, grid)
        s = _std_from_sums(s1, s2, cnt)
    else:
        oh, ow = grid.onehots(x.dtype)
        cnt = grid.counts().to(x.dtype)
        mean = torch.einsum("nchw,ah,bw->ncab", x, oh, ow) / cnt
        d = x - grid.expand(mean)
        ss = torch.einsum("nchw,ah,bw->ncab", d * d, oh, ow)
        s = torch.sqrt(ss / (cnt - 1))
    return torch.nan_to_num(s, nan=0.0, posinf=0.0)


@dataclass
class QCodes:
    """Integer codes of a quantized activation, attached to its float tensor as ``_cadyq_codes``
    for the integer kernels (:mod:`cadyq_cli.quant.kernels`).

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


def _quantize(m: nn.Module, x: torch.Tensor, alpha: torch.Tensor, qmax: torch.Tensor | float,
              steps: Callable[[], list[float]], which: torch.Tensor | None = None,
              grid: RegionGrid | None = None) -> torch.Tensor:
    """``fake_quant_act`` for quantizer ``m``; at CPU inference, when ``m`` feeds a quantized conv
    (``m.emit_codes``), the int8 codes are attached to the result as ``_cadyq_codes``.

    ``steps()`` gives the float step of each bit-width ``which`` indexes (only called then).
    """
    if not (m.emit_codes and x.device.type == "cpu" and not m.training
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return fake_quant_act(x, alpha, qmax, inplace=m.inplace, signed=m.signed)
    codes = act_codes(x, alpha, qmax, m.inplace, m.signed)
    i8 = codes.to(torch.int8 if m.signed else torch.uint8, memory_format=torch.channels_last)
    out = codes.div_(qmax).mul_(alpha)  # the same operations as fake_quant_act: same float values
    out._cadyq_codes = QCodes(i8, steps(), which, grid)
    return out


@dataclass
class QuantContext:
    """Per-forward state shared by all selectors of one model call.

    Attributes:
        grad: (N, 2, nh, nw) image-gradient features (x then y) per region.
        grid: the region partition, or None for one region per sample.
        bits: bits chosen by each selector in forward order, each (N, nh, nw) float.
        soft_bits: training only: expected bits per selector under the soft choice, each (N,).
    """

    grad: torch.Tensor
    grid: RegionGrid | None = None
    bits: list[torch.Tensor] = field(default_factory=list)
    soft_bits: list[torch.Tensor] = field(default_factory=list)


def conv_forward(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv`` applied with ``weight``; thin convs (<= 4 input channels) run sample by sample at inference.

    PyTorch picks different CPU kernels for 3-channel convs depending on the batch size, so a
    patch's result would change (by an ulp, enough to flip a later quantizer rounding) with the
    batch it runs in. Running these tiny layers one sample at a time, in float32, gives every
    patch exactly what a batch-1 forward gives (the official protocol runs each patch alone)
    at negligible cost. Wider convs are kept batch invariant by
    :meth:`cadyq_cli.models._base.SRModel._invariant_chunk`.
    """
    if (
        conv.in_channels <= 4
        and x.shape[0] > 1
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    ):
        return torch.cat([conv._conv_forward(x[i : i + 1], weight, conv.bias) for i in range(x.shape[0])])
    return conv._conv_forward(x, weight, conv.bias)


class InputConv2d(nn.Conv2d):
    """A full-precision conv reading the image (see :func:`conv_forward` for why it exists)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return conv_forward(self, x, self.weight)


class QuantConv2d(nn.Conv2d):
    """Conv2d whose weight is fake-quantized to 8 bits (symmetric, per tensor); bias stays FP.

    In eval mode the quantized weight is computed once and cached until the weight changes.
    """

    weight_bits: int = 8

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.mode: QuantMode = MODES["dynamic"]
        self._wq_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    def quantized_weight(self) -> torch.Tensor:
        """The 8-bit fake-quantized weight (cached outside of autograd)."""
        if self.training or torch.is_grad_enabled() and self.weight.requires_grad:
            return fake_quant_weight(self.weight, self.weight_bits)
        key = (self.weight._version, self.weight.data_ptr())
        if self._wq_cache is None or self._wq_cache[0] != key or self._wq_cache[1].device != self.weight.device:
            with torch.no_grad():
                self._wq_cache = (key, fake_quant_weight(self.weight, self.weight_bits))
        return self._wq_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.mode.quantized:
            q = getattr(x, "_cadyq_codes", None)
            if q is not None and not torch.is_grad_enabled():
                return int8_conv(q, self)
            return conv_forward(self, x, self.quantized_weight())
        return conv_forward(self, x, self.weight)


class ActQuantizer(nn.Module):
    """PAMS activation quantizer ``Q_b(x; alpha)`` with a learned clip value.

    Fixed quantizers (EDSR ``quant_act3``, IDN ``fblock``) always use their own ``bits``
    when the model is quantized. Inside a :class:`BitSelector` they are the candidates.

    Set ``calibrating = True`` to make a forward pass record the batch mean of the
    per-sample max |x| into ``alpha`` (and ``max_val``) and return x unchanged: this is how
    clip values are initialized from activation statistics.

    ``signed`` (default True, the official grid) chooses the signed symmetric grid; False the
    unsigned one (clip ``[0, alpha]``, ``2**bits`` levels) for a non-negative (ReLU) input.
    """

    def __init__(self, bits: int = 8, alpha: float = 10.0) -> None:
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor([alpha]))
        self.register_buffer("max_val", torch.tensor(alpha))
        self.mode: QuantMode = MODES["dynamic"]
        self.calibrating = False
        #: the caller never reads this quantizer's input again: quantize in place at inference
        self.inplace = False
        #: integer kernels: attach the integer codes to the output (set by ``set_kernels``)
        self.emit_codes = False
        #: signed symmetric grid (official) or unsigned grid (ReLU inputs; see ``SRModel.set_act_grid``)
        self.signed = True

    @torch.no_grad()
    def calibrate_(self, x: torch.Tensor) -> None:
        """Set alpha to the batch mean of per-sample max |x| (the PAMS initialization)."""
        v = x.detach().abs().flatten(1).max(dim=1).values.mean().float()
        self.max_val.copy_(v)
        self.alpha.copy_(v.clamp_min(1e-3).reshape(1))

    def quantize(self, x: torch.Tensor, bits: int | None = None) -> torch.Tensor:
        """Q_bits(x; alpha), ignoring the mode."""
        return fake_quant_act(x, self.alpha, float(qmax_for_bits(bits or self.bits, self.signed)), signed=self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.calibrating:
            self.calibrate_(x)
            return x
        if not self.mode.quantized:
            return x
        qmax = float(qmax_for_bits(self.bits, self.signed))
        return _quantize(self, x, self.alpha, qmax, lambda: [float(self.alpha) / qmax])


class BitSelector(nn.Module):
    """CADyQ bit selector for one layer: picks 4, 6 or 8 bits per sample (or per region).

    Features ``z = [g_x, g_y, std_1 .. std_C]``: the image-gradient feature of the network
    input and the unbiased per-channel std of this layer's input. ``logits = net_small(z)``,
    ``bits = (4, 6, 8)[argmax]``, and the input is quantized by the chosen candidate,
    each with its own clip value.

    At inference only the chosen quantization is computed (the official straight-through
    expression ``hard - soft + soft`` equals it up to float rounding; spec §5.2). In training
    the choice is a straight-through Gumbel-softmax (or plain softmax with ``tau``) and the
    expected bits are recorded for the bit loss.

    Args:
        channels: C, channels of the quantized tensor.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.quant_bit1 = ActQuantizer(CANDIDATE_BITS[0])
        self.quant_bit2 = ActQuantizer(CANDIDATE_BITS[1])
        self.quant_bit3 = ActQuantizer(CANDIDATE_BITS[2])
        self.net_small = nn.Sequential(nn.Linear(channels + 2, 3))
        with torch.no_grad():  # official init: every layer starts at 8 bits
            self.net_small[0].weight.fill_(1.0)
            self.net_small[0].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
        self.mode: QuantMode = MODES["dynamic"]
        #: the caller never reads this selector's input again: quantize in place at inference
        self.inplace = False
        #: integer kernels: attach the integer codes to the output (set by ``set_kernels``)
        self.emit_codes = False
        #: the input is a ReLU output (never negative): the unsigned grid may be used for it
        self.after_relu = False
        self.gumbel = True
        self.tau = 1.0
        #: training only: (mean, scale) of the features z. When set, ``net_small`` acts on
        #: (z - mean) / scale; :meth:`folded_linear` gives the equivalent raw-feature weights
        self.znorm: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_buffer("_bits_table", torch.tensor(CANDIDATE_BITS, dtype=torch.float32), persistent=False)
        self.register_buffer(
            "_qmax_table", torch.tensor([float(qmax_for_bits(b)) for b in CANDIDATE_BITS]), persistent=False
        )

    @property
    def signed(self) -> bool:
        """True on the signed symmetric grid (official), False on the unsigned grid."""
        return self.quant_bit1.signed

    def set_signed(self, signed: bool) -> None:
        """Quantize on the signed symmetric grid (True) or the unsigned one (False, ReLU inputs)."""
        for q in self.candidates:
            q.signed = signed
        self._qmax_table = torch.tensor([float(qmax_for_bits(b, signed)) for b in CANDIDATE_BITS],
                                        device=self._qmax_table.device)

    @property
    def candidates(self) -> tuple[ActQuantizer, ActQuantizer, ActQuantizer]:
        """The 4-, 6- and 8-bit quantizers."""
        return (self.quant_bit1, self.quant_bit2, self.quant_bit3)

    def alphas(self) -> torch.Tensor:
        """(3,) clip values of the 4-, 6- and 8-bit candidates."""
        return torch.cat([q.alpha for q in self.candidates])

    def logits(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:
        """Selector logits per sample and region: (N, nh, nw, 3)."""
        with torch.autocast(x.device.type, enabled=False):  # decisions always in float32
            z = self.features(x, ctx)
            if self.znorm is not None:
                z = (z - self.znorm[0]) / self.znorm[1]
            return self.net_small(z)

    def features(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:
        """Raw selector features z = [g_x, g_y, std_1..std_C] per sample and region: (N, nh, nw, C + 2)."""
        std = region_std(x.float(), ctx.grid)  # (N, C, nh, nw)
        return torch.cat([ctx.grad.float(), std], dim=1).permute(0, 2, 3, 1)

    def folded_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of ``net_small`` acting on raw features (folds :attr:`znorm` in)."""
        w, b = self.net_small[0].weight.detach(), self.net_small[0].bias.detach()
        if self.znorm is None:
            return w.clone(), b.clone()
        mean, scale = self.znorm
        wf = w / scale
        return wf, b - wf @ mean

    def forward(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:
        """Quantize x (N, C, H, W) and append the chosen bits (N, nh, nw) to ``ctx.bits``."""
        mode = self.mode
        if not mode.quantized:
            return x
        n = x.shape[0]
        if mode.act_bits is not None:  # fixed wKaK: the candidate for K bits with its own alpha
            k = CANDIDATE_BITS.index(mode.act_bits)
            nh, nw = ctx.grad.shape[2:]
            ctx.bits.append(torch.full((n, nh, nw), float(mode.act_bits), device=x.device))
            alpha, qmax = self.candidates[k].alpha, float(qmax_for_bits(mode.act_bits, self.signed))
            return _quantize(self, x, alpha, qmax, lambda: [float(alpha) / qmax])
        if self.training:
            return self._forward_train(x, ctx)
        idx = self.logits(x, ctx).argmax(dim=-1)  # (N, nh, nw); first maximum wins
        ctx.bits.append(self._bits_table[idx])
        alpha = self.alphas()[idx]  # float32: the quantization grid is never rounded to bf16
        qmax = self._qmax_table[idx]
        if ctx.grid is None or idx.shape[1:] == (1, 1):
            alpha = alpha.reshape(n, 1, 1, 1)
            qmax = qmax.reshape(n, 1, 1, 1)
        else:
            alpha = ctx.grid.expand(alpha).unsqueeze(1)
            qmax = ctx.grid.expand(qmax).unsqueeze(1)
        return _quantize(self, x, alpha, qmax, lambda: (self.alphas() / self._qmax_table).tolist(), idx, ctx.grid)

    def _forward_train(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:
        """Straight-through soft choice, one decision per sample (training uses patches)."""
        logits = self.logits(x, ctx).mean(dim=(1, 2))  # (N, 3)
        if self.gumbel:
            probs = F.gumbel_softmax(logits, tau=self.tau, hard=False)
        else:
            probs = F.softmax(logits / self.tau, dim=-1)
        hard = F.one_hot(probs.argmax(-1), 3).to(probs.dtype)
        w = hard - probs.detach() + probs  # forward: one-hot; backward: soft
        outs = torch.stack([q.quantize(x, b) for q, b in zip(self.candidates, CANDIDATE_BITS)], dim=1)
        ctx.bits.append((hard * self._bits_table).sum(-1).reshape(-1, 1, 1))  # elementwise: no bf16 matmul
        ctx.soft_bits.append((probs * self._bits_table).sum(-1))
        return (w.reshape(*w.shape, 1, 1, 1).to(outs.dtype) * outs).sum(dim=1)
