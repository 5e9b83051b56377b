"""What every backbone shares: input convention, gradient feature, mean shift, forward contract."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedScaleError
from ..quant.modes import MODES, QuantMode
from ..quant.modules import BitSelector, QuantContext
from ..quant.regions import RegionGrid, region_mean

__all__ = ["SRModel", "MeanShift", "PixelShuffle", "grad_feature", "DIV2K_RGB_MEAN", "ACT_GRIDS", "FP_LAYERS"]

#: Activation grids: ``signed`` (official: every quantizer on a signed symmetric grid) or
#: ``relu-unsigned`` (selectors whose input is a ReLU output use the unsigned grid, so a b-bit code
#: spends all 2**b levels on the values that occur; costs are unchanged).
ACT_GRIDS = ("signed", "relu-unsigned")

#: Precisions of the full-precision upsampling tail at inference: ``fp32`` (default, the reference)
#: or ``bf16`` (opt-in, for CPUs with native bf16: the tail's convs run under bf16 autocast).
FP_LAYERS = ("fp32", "bf16")

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)

#: per-sample input elements up to which PyTorch runs a batch-1 CPU conv natively (see
#: :meth:`SRModel._invariant_chunk`)
_NATIVE_CONV_NUMEL = 20480

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


class PixelShuffle(nn.PixelShuffle):
    """``nn.PixelShuffle`` with a faster CPU inference path (same values, same module name).

    ATen's CPU pixel shuffle takes about 2.5x the time of one explicit strided copy into the
    output layout; on an EDSR x4 forward it was 10-14 % of the total. With autograd on, the
    stock operator is used.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if torch.is_grad_enabled() and x.requires_grad or x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        r = self.upscale_factor
        n, c, h, w = x.shape
        c_out = c // (r * r)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # channels-last in, channels-last out (the integer path runs channels-last)
            out = torch.empty((n, h, r, w, r, c_out), dtype=x.dtype, device=x.device)
            out.copy_(x.permute(0, 2, 3, 1).reshape(n, h, w, c_out, r, r).permute(0, 1, 4, 2, 5, 3))
            return out.reshape(n, h * r, w * r, c_out).permute(0, 3, 1, 2)
        out = torch.empty((n, c_out, h, r, w, r), dtype=x.dtype, device=x.device)
        out.copy_(x.reshape(n, c_out, r, r, h, w).permute(0, 1, 4, 2, 5, 3))
        return out.reshape(n, c_out, h * r, w * r)


def grad_feature(x01: torch.Tensor, grid: RegionGrid | None = None) -> torch.Tensor:
    """CADyQ image-gradient feature: mean |Sobel_x|, mean |Sobel_y| of the gray image per region.

    Args:
        x01: (N, 3, H, W) float RGB in [0, 1].
        grid: regions, or None for one region (the whole input) per sample.

    Returns:
        (N, 2, nh, nw) float32, x-then-y order, not yet multiplied by any backbone factor.
    """
    x01 = x01.float()
    gray = (0.299 * x01[:, 0:1] + 0.587 * x01[:, 1:2]) + 0.114 * x01[:, 2:3]
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    k = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(padded)
    g = F.conv2d(padded, k).abs()
    return region_mean(g, grid)


class MeanShift(nn.Conv2d):
    """1x1 conv with identity weight adding ``sign * range * mean`` (stored in the state dict)."""

    def __init__(self, rgb_range: float, sign: int, mean: tuple[float, float, float] = DIV2K_RGB_MEAN) -> None:
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(mean))
        for p in self.parameters():
            p.requires_grad_(False)


def _bf16(tail: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``tail`` run under bf16 autocast, returning float32."""

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(t.device.type, dtype=torch.bfloat16):
            return tail(t).float()

    return run


#: what :meth:`SRModel.fold_bit_floor` folds into a selector's 8-bit logit (and takes from its 4-bit one): far
#: beyond any logit a selector computes, so the choice is 8 bits always
BIT_FLOOR_BIAS = 1.0e4


def _finite_bias(bias: float) -> float:
    """``bias`` as a float; ValueError unless it is finite (the compute dial's and its folded form's check)."""
    bias = float(bias)
    if bias != bias or abs(bias) == float("inf"):
        raise ValueError(f"the bit bias must be a finite number, not {bias}")
    return bias


class SRModel(nn.Module):
    """Base of the four backbones.

    ``forward(x)`` takes (N, 3, H, W) float32 RGB on the 0..255 scale (each backbone converts
    to its own range internally, e.g. CARN works on 0..1) and returns ``(sr, bits)``:
    sr (N, 3, sH, sW) on the 0..255 scale, not clamped; bits (N, n_selectors) float, the bits
    each selector chose in forward order, or (N, n_selectors, nh, nw) when a region grid is
    given. In ``fp32`` mode bits has zero columns.

    After each forward, :attr:`last_context` holds its :class:`~cadyq_cli.quant.modules.QuantContext`
    (the last chunk's when an inference batch ran in chunks); :meth:`soft_bits` reads the
    expected bits a training forward's selectors chose (the bit loss).
    """

    arch: ClassVar[str] = ""
    supported_scales: ClassVar[tuple[int, ...]] = (2, 3, 4)
    grad_multiplier: ClassVar[float] = 1000.0  # EDSR, SRResNet, IDN; CARN uses 1 (spec §5.1)
    #: LR pixels of context a pixel's output depends on (receptive-field radius, generous).
    receptive_radius: ClassVar[int] = 48
    #: residual-skip semantics the backbone offers (see :meth:`set_skip`); ``official`` first
    skips: ClassVar[tuple[str, ...]] = ("official",)
    #: one state dict holds an upsampler per supported scale (CARN): ``scale`` picks the one that runs, and
    #: training may cover several (``cadyq train --scales``)
    multi_scale: ClassVar[bool] = False

    def __init__(self, scale: int) -> None:
        super().__init__()
        if scale not in self.supported_scales:
            raise UnsupportedScaleError(
                f"{self.arch} supports scales {', '.join(map(str, self.supported_scales))}, not x{scale}"
            )
        self.scale = scale
        self.mode: QuantMode = MODES["dynamic"]
        self.act_grid = "signed"
        self.skip = "official"
        self.fp_layers = "fp32"
        self.bit_bias = 0.0
        self._bits_only = False
        self.last_context: QuantContext | None = None

    def soft_bits(self) -> torch.Tensor:
        """Expected bits per sample and selector of the last training forward, (N, n_selectors),
        differentiable (the selectors' soft choice); empty columns when no selector ran soft."""
        ctx = self.last_context
        if ctx is None:
            raise RuntimeError("soft_bits() needs a forward first")
        if not ctx.soft_bits:
            return ctx.grad.new_zeros((ctx.grad.shape[0], 0))
        return torch.stack(ctx.soft_bits, dim=1)

    def set_bit_bias(self, bias: float) -> None:
        """The compute dial: ``bias`` is added to every selector's 4-bit logit and subtracted from
        its 8-bit logit at inference, so ``bias > 0`` picks fewer bits and ``bias < 0`` more;
        0 is the model as trained (bit for bit). Training ignores it."""
        bias = _finite_bias(bias)
        for sel in self.selectors:
            sel.bit_bias = bias
        self.bit_bias = bias

    @torch.no_grad()
    def fold_bit_bias(self, bias: float) -> None:
        """Make the compute dial's ``bias`` part of the weights: each selector's output bias gets ``+bias`` on
        the 4-bit logit and ``-bias`` on the 8-bit one, so the model picks at ``bias`` with the dial at 0 (the
        same choices as :meth:`set_bit_bias` up to float rounding at exact ties). Official format unchanged."""
        bias = _finite_bias(bias)
        for sel in self.selectors:
            b = sel.net_small[0].bias
            b.add_(b.new_tensor([bias, 0.0, -bias]))

    def selector_names(self) -> list[str]:
        """The names of the model's bit selectors (``body.0.bitsel1``, ...), in :attr:`selectors`' order."""
        names = {id(m): n for n, m in self.named_modules()}
        return [names[id(sel)] for sel in self.selectors]

    @torch.no_grad()
    def fold_bit_floor(self, layers: Iterable[str]) -> None:
        """Floor the selectors named in ``layers`` (:meth:`selector_names`) at 8 bits: their output bias gets
        ``-BIT_FLOOR_BIAS`` on the 4-bit logit and ``+BIT_FLOOR_BIAS`` on the 8-bit one, so they pick 8 bits on
        every patch at any dial setting short of that size (1e4); the other selectors' weights are unchanged (their
        choices still follow their inputs, which the floors change). Official format unchanged.
        ValueError for a name that is no selector."""
        by_name = dict(zip(self.selector_names(), self.selectors))
        layers = list(dict.fromkeys(layers))
        if unknown := [n for n in layers if n not in by_name]:
            raise ValueError(f"no bit selector {unknown[0]!r} in {self.arch} (its selectors: "
                             f"{', '.join(by_name)})")
        for name in layers:
            b = by_name[name].net_small[0].bias
            b.add_(b.new_tensor([-BIT_FLOOR_BIAS, 0.0, BIT_FLOOR_BIAS]))

    @contextmanager
    def bits_only(self) -> Iterator[None]:
        """Inside, an inference forward chooses every selector's bits but skips the upsampling tail
        (its ``sr`` is a placeholder): the cheap probe behind a FAB target."""
        old, self._bits_only = self._bits_only, True
        try:
            yield
        finally:
            self._bits_only = old

    def set_fp_layers(self, precision: str) -> None:
        """Precision of the upsampling tail at inference (one of :data:`FP_LAYERS`).

        ``bf16`` runs the tail (upsampler and last conv, the bulk of the full-precision work)
        under CPU bf16 autocast and returns float32; bits and every quantized layer are
        unchanged. Training always runs the tail as configured by the training loop.
        """
        if precision not in FP_LAYERS:
            raise ValueError(f"unknown full-precision layer type {precision!r}; choose one of {', '.join(FP_LAYERS)}")
        self.fp_layers = precision

    def fp_precision(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn`` (a full-precision tail) as it runs here: under bf16 autocast with ``fp_layers == "bf16"``
        at inference, else unchanged."""
        if self._bits_only and not self.training:
            return lambda t: t.new_zeros((t.shape[0], 3, 1, 1))
        return _bf16(fn) if self.fp_layers == "bf16" and not self.training else fn

    def set_skip(self, skip: str) -> None:
        """Residual-skip semantics: ``official``, or ``fp`` (EDSR: the block skip adds the
        unquantized block input, not the quantized one; costs are unchanged, since every conv
        reads the same quantized tensor). Weights record theirs (``skip``)."""
        if skip not in self.skips:
            raise ValueError(f"{self.arch} offers the skips {', '.join(self.skips)}, not {skip!r}")
        self.skip = skip

    def set_act_grid(self, grid: str) -> None:
        """Use activation grid ``grid`` (one of :data:`ACT_GRIDS`) from now on.

        ``relu-unsigned`` puts every selector marked ``after_relu`` on the unsigned grid
        (clip ``[0, alpha]``, ``qmax = 2**bits - 1``); ``signed`` is the official semantics.
        A checkpoint's clips are learned for one grid: weights record theirs (``act_grid``).
        """
        if grid not in ACT_GRIDS:
            raise ValueError(f"unknown activation grid {grid!r}; choose one of {', '.join(ACT_GRIDS)}")
        for sel in self.selectors:
            sel.set_signed(grid == "signed" or not sel.after_relu)
        self.act_grid = grid

    @property
    def act_shift(self) -> bool:
        """True where the selectors quantize their input after a learned per-channel shift
        (:meth:`BitSelector.enable_shift`); the official quantizer has none."""
        return any(sel.act_shift is not None for sel in self.selectors)

    def enable_act_shift(self) -> None:
        """Give every selector a learned per-channel input shift (zero at first: the model is unchanged)."""
        for sel in self.selectors:
            sel.enable_shift()

    @property
    def selectors(self) -> list[BitSelector]:
        """Bit selectors in forward (call) order."""
        return [m for m in self.modules() if isinstance(m, BitSelector)]

    @property
    def n_selectors(self) -> int:
        """Number of bit selectors (the FAB divisor)."""
        return len(self.selectors)

    def forward_features(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:
        """Backbone forward on the 0..255 input; implemented by each architecture."""
        raise NotImplementedError

    #: inference: the upsampling tail runs in row strips whose large intermediates stay under
    #: about this many bytes (memory bounded by the strip, not by the tile)
    tail_budget_bytes: int = 1 << 28

    def run_tail(self, feat: torch.Tensor, tail: Callable[[torch.Tensor], torch.Tensor], halo: int = 3,
                 channels: int = 64) -> torch.Tensor:
        """``tail(feat)`` for an upsampling tail of convs whose receptive radius is <= ``halo`` LR px.

        At inference, a large ``feat`` (N, C, H, W) runs in row strips, each with ``halo`` rows
        of context on both sides, so the HR intermediates (``channels`` x scale² per LR pixel,
        two alive at a time) stay under :attr:`tail_budget_bytes`. Each output pixel is
        computed from the same inputs as without strips.
        """
        tail = self.fp_precision(tail)
        if self._bits_only and not self.training:
            return tail(feat)
        n, _, h, w = feat.shape
        per_row = 8 * channels * self.scale * self.scale * n * w
        rows = max(8, self.tail_budget_bytes // max(per_row, 1))
        if self.training or torch.is_grad_enabled() or rows >= h:
            return tail(feat)
        s = self.scale
        out = None
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            a, b = max(0, y0 - halo), min(h, y1 + halo)
            part = tail(feat[:, :, a:b])
            if out is None:
                out = part.new_empty((n, part.shape[1], h * s, w * s))
            out[:, :, y0 * s : y1 * s] = part[:, :, (y0 - a) * s : (y1 - a) * s]
        return out

    def _invariant_chunk(self, x: torch.Tensor) -> int:
        """Largest batch chunk whose convolutions take the same CPU kernel as a batch of one.

        PyTorch (``use_mkldnn`` in ATen's Convolution.cpp) runs a batch of one on its native
        kernel when the per-sample input of a non-grouped conv with a kernel of at most 3x3 has
        no more than 20480 elements, but any larger batch on oneDNN; single-threaded, 1x1 convs
        switch to oneDNN from a batch of 16. The two kernels round differently, and one flipped
        quantizer rounding can change a patch's output by many grey levels, so batched
        inference would no longer equal the official per-patch inference. Small tiles are
        therefore run one at a time (they are cheap) and 1x1-conv models in chunks of 15.
        Convs with at most 4 input channels are excluded: they run sample by sample
        (:func:`~cadyq_cli.quant.modules.conv_forward`) or are identity mean shifts.
        """
        n = x.shape[0]
        if n == 1 or x.device.type != "cpu" or torch.is_grad_enabled() or self.training:
            return n
        info = getattr(self, "_conv_paths", None)
        if info is None:
            convs = [
                m for m in self.modules()
                if type(m) is not MeanShift and isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 4
            ]
            min_cin = min((m.in_channels for m in convs if not (m.kernel_size[0] > 3 and m.kernel_size[1] > 3)), default=0)
            has_1x1 = any(m.kernel_size == (1, 1) for m in convs)
            info = self._conv_paths = (min_cin, has_1x1)
        min_cin, has_1x1 = info
        if min_cin * x.shape[2] * x.shape[3] <= _NATIVE_CONV_NUMEL:
            return 1
        if has_1x1 and n >= 16:
            return 15
        return n

    def forward(self, x: torch.Tensor, grid: RegionGrid | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Super-resolve a batch; see the class docstring for the contract."""
        # Conv kernels (and so float rounding) depend on the memory layout; a permuted HWC image
        # would run channels-last. Use the official layout (np2Tensor: contiguous NCHW).
        x = x.contiguous()
        chunk = self._invariant_chunk(x)
        if chunk < x.shape[0]:
            parts = [self._forward_batch(x[i : i + chunk], grid) for i in range(0, x.shape[0], chunk)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return self._forward_batch(x, grid)

    def _forward_batch(self, x: torch.Tensor, grid: RegionGrid | None) -> tuple[torch.Tensor, torch.Tensor]:
        grad = grad_feature(x / 255.0, grid) * self.grad_multiplier
        ctx = QuantContext(grad=grad, grid=grid)
        sr = self.forward_features(x, ctx)
        n = x.shape[0]
        nh, nw = grad.shape[2:]
        bits = torch.stack(ctx.bits, dim=1) if ctx.bits else x.new_zeros((n, 0, nh, nw))
        if grid is None:
            bits = bits.reshape(n, -1)
        self.last_context = ctx
        return sr, bits
