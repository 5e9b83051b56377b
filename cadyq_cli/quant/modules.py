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

from .kernels import PackedWeight, QCodes, conv_geometry, pack_weight, qconv2d
from .modes import CANDIDATE_BITS, MODES, QuantMode, parse_mode
from .primitives import act_codes, fake_quant_act, fake_quant_weight, qmax_for_bits, weight_scale
from .regions import RegionGrid, region_std

__all__ = [
    "QuantContext", "QuantConv2d", "InputConv2d", "ActQuantizer", "BitSelector", "conv_forward", "set_quant_mode",
    "has_act_shifts",
]


def has_act_shifts(sd: object) -> bool:
    """Whether a state dict (any mapping of names) holds selectors' learned input shifts (``*.act_shift``)."""
    return any(str(k).endswith(".act_shift") for k in sd)  # type: ignore[attr-defined]


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

    def int8_weight(self, zp: int) -> PackedWeight:
        """The 8-bit weight codes packed for the integer kernel, for inputs of zero point ``zp``
        (cached until the weight changes)."""
        key = (self.weight._version, self.weight.data_ptr(), zp)
        cache = getattr(self, "_int8_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                m, qmax = weight_scale(self.weight, self.weight_bits)  # the fake_quant_weight grid
                codes = torch.round(self.weight.detach() * qmax / m).to(torch.int8)
                cache = (key, pack_weight(codes, float(m) / qmax, conv_geometry(self), zp))
            self._int8_cache = cache
        return cache[1]

    def int8_forward(self, q: QCodes) -> torch.Tensor:
        """This conv on the integer codes ``q`` of its quantized input (exact int32 sums, float32 out)."""
        bias = self.bias.detach().float() if self.bias is not None else None
        return qconv2d(q, self.int8_weight(q.zero_point), bias, conv_geometry(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.mode.quantized:
            q = getattr(x, "_cadyq_codes", None)
            if q is not None and not torch.is_grad_enabled():
                return self.int8_forward(q)
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
    input and the unbiased per-channel std of this layer's input. With a learned input shift
    (:meth:`enable_shift`, off by default) it quantizes ``x + t``; the features read ``x``. ``logits = net_small(z)``,
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
        #: inference only: added to the 4-bit logit and subtracted from the 8-bit one (the compute
        #: dial, ``SRModel.set_bit_bias``): > 0 fewer bits, < 0 more, 0 the model as trained
        self.bit_bias = 0.0
        #: training only: (mean, scale) of the features z. When set, ``net_small`` acts on
        #: (z - mean) / scale; :meth:`folded_linear` gives the equivalent raw-feature weights
        self.znorm: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_buffer("_bits_table", torch.tensor(CANDIDATE_BITS, dtype=torch.float32), persistent=False)
        self.register_buffer(
            "_qmax_table", torch.tensor([float(qmax_for_bits(b)) for b in CANDIDATE_BITS]), persistent=False
        )
        #: learned per-channel shift added to the input before it is quantized (None: off, the official
        #: quantizer); see :meth:`enable_shift`
        self.act_shift: nn.Parameter | None = None

    def enable_shift(self) -> None:
        """Give this selector a learned per-channel shift ``t`` (C,), zero at first: it quantizes ``x + t``.

        The redistribution of QuantSR (Qin et al., NeurIPS 2023), implemented from the paper: each channel's
        values move against the per-tensor grid before rounding, so a channel whose values sit off-centre (or
        a ReLU output's small values, which a negative ``t`` zeroes) is coded with its levels where they are.
        The shift is part of the network (every mode adds it, fp32 included): the layers reading it learn with
        it. The selector's features read the unshifted input (a channel's std does not depend on ``t``).
        Integer kernels stay exact: the codes are those of ``x + t`` on the same grid.
        """
        if self.act_shift is None:
            a = self.quant_bit1.alpha
            self.act_shift = nn.Parameter(torch.zeros(self.channels, dtype=a.dtype, device=a.device))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        """A state dict with this selector's shift gives it one first (weights trained with ``--act-shift`` load
        strictly into a freshly built model, wherever the selector sits)."""
        if self.act_shift is None and prefix + "act_shift" in state_dict:
            self.enable_shift()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """``x + t`` (a new tensor), or ``x`` itself without a shift."""
        if self.act_shift is None:
            return x
        return x + self.act_shift.reshape(1, -1, 1, 1)

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
            return self.shifted(x)
        n = x.shape[0]
        if mode.act_bits is not None:  # fixed wKaK: the candidate for K bits with its own alpha
            k = CANDIDATE_BITS.index(mode.act_bits)
            nh, nw = ctx.grad.shape[2:]
            ctx.bits.append(torch.full((n, nh, nw), float(mode.act_bits), device=x.device))
            alpha, qmax = self.candidates[k].alpha, float(qmax_for_bits(mode.act_bits, self.signed))
            return _quantize(self, self.shifted(x), alpha, qmax, lambda: [float(alpha) / qmax])
        if self.training:
            return self._forward_train(x, ctx)
        logits = self.logits(x, ctx)
        x = self.shifted(x)  # after the features: they read the unshifted input
        if self.bit_bias:
            logits = logits + logits.new_tensor([self.bit_bias, 0.0, -self.bit_bias])
        idx = logits.argmax(dim=-1)  # (N, nh, nw); first maximum wins
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
        xs = self.shifted(x)
        outs = torch.stack([q.quantize(xs, b) for q, b in zip(self.candidates, CANDIDATE_BITS)], dim=1)
        ctx.bits.append((hard * self._bits_table).sum(-1).reshape(-1, 1, 1))  # elementwise: no bf16 matmul
        ctx.soft_bits.append((probs * self._bits_table).sum(-1))
        return (w.reshape(*w.shape, 1, 1, 1).to(outs.dtype) * outs).sum(dim=1)


def set_quant_mode(model: nn.Module, mode: str | QuantMode) -> QuantMode:
    """Switch every quantized module of ``model`` to ``mode`` in place."""
    qm = parse_mode(mode)
    for m in model.modules():
        if isinstance(m, (QuantConv2d, ActQuantizer, BitSelector)):
            m.mode = qm
    if hasattr(model, "mode"):
        model.mode = qm
    return qm
