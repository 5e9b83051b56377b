"""Cost accounting: MACs per layer, BitOPs and FAB.

Definitions (printed by the report and the README):

* **MACs** of a convolution: ``C_out * C_in / groups * k_h * k_w * H_out * W_out``
  (transposed conv: the same per input pixel).
* **BitOPs** = sum over all convolutions of ``MACs x weight bits x activation bits``.
  Quantized convs have 8-bit weights and the bits of the quantizer that produced their input
  (the selector's choice per region, a fixed quantizer's bits, or 32 when the input is not
  quantized, e.g. SRResNet's conv1, spec §6). Full-precision layers count 32 x 32.
* **FAB** (feature average bit-width) = mean of the bits chosen by the selectors of a region;
  an image's FAB is the unweighted mean over its regions (patches), as in the paper.
* The FP32 figure is the same network with every conv at 32 x 32.

MACs scale with pixels, so they are measured once per model with a probe forward and then
evaluated for any input size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .modes import set_quant_mode
from .modules import ActQuantizer, BitSelector, QuantConv2d

__all__ = ["ConvCost", "cost_table", "bitops", "fab"]


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


@torch.no_grad()
def cost_table(model: nn.Module, probe: int = 8) -> list[ConvCost]:
    """Measure every conv of ``model`` with one small forward (cached on the model)."""
    cached = getattr(model, "_cadyq_cost_table", None)
    if cached is not None:
        return cached
    old_mode = getattr(model, "mode", None)
    set_quant_mode(model, "dynamic")
    produced: list[tuple[torch.Tensor, int | None, int, str]] = []  # keeps outputs alive: identity is safe
    sel_index = {id(s): i for i, s in enumerate(m for m in model.modules() if isinstance(m, BitSelector))}
    names = {id(m): n for n, m in model.named_modules()}
    rows: list[ConvCost] = []
    handles = []

    def on_quant(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, BitSelector):
            produced.append((out, sel_index[id(mod)], 8, names[id(mod)]))
        else:
            produced.append((out, None, mod.bits, names[id(mod)]))

    def on_conv(name: str):  # noqa: ANN202
        def hook(mod: nn.Conv2d | nn.ConvTranspose2d, inp: tuple, out: torch.Tensor) -> None:
            x = inp[0]
            src = next(((s, b, n) for t, s, b, n in reversed(produced) if t is x), None)
            k = mod.kernel_size[0] * mod.kernel_size[1]
            if isinstance(mod, nn.ConvTranspose2d):
                macs = x.numel() / x.shape[0] * mod.out_channels / mod.groups * k
            else:
                macs = out.numel() / out.shape[0] * mod.in_channels / mod.groups * k
            px = probe * probe  # LR pixels: convs after an upsampler see more pixels than the input
            quant = isinstance(mod, QuantConv2d)
            sel, bits, feeder = (src if src is not None else (None, 32, None))
            rows.append(ConvCost(name, macs / px, 8 if quant else 32, sel, bits, feeder))

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, (BitSelector, ActQuantizer)):  # candidates inside selectors never fire
            handles.append(mod.register_forward_hook(on_quant))
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) and "mean" not in name:
            handles.append(mod.register_forward_hook(on_conv(name)))
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        model(torch.rand(1, 3, probe, probe, device=dev) * 255)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if old_mode is not None:
            set_quant_mode(model, old_mode)
    model._cadyq_cost_table = rows  # type: ignore[attr-defined]
    return rows


def bitops(table: list[ConvCost], region_px: torch.Tensor, region_bits: torch.Tensor | None,
           fixed_bits: int | None = None) -> float:
    """BitOPs of one forward.

    Args:
        table: from :func:`cost_table`.
        region_px: (R,) pixels of each region (LR).
        region_bits: (R, n_selectors) bits chosen per region, or None.
        fixed_bits: when given, every selector uses these bits (``w8aK``); ``32`` together with
            ``region_bits=None`` means the FP32 model (all convs 32 x 32).
    """
    px = region_px.double()
    total = 0.0
    fp = fixed_bits == 32
    for c in table:
        if fp:
            total += c.macs_per_px * float(px.sum()) * 32 * 32
            continue
        if c.act_selector is not None:
            if region_bits is not None:
                ab = (region_bits[:, c.act_selector].double() * px).sum()
            else:
                ab = float(fixed_bits or 8) * px.sum()
            total += c.macs_per_px * c.weight_bits * float(ab)
        else:
            total += c.macs_per_px * c.weight_bits * c.act_bits * float(px.sum())
    return total


def fab(region_bits: torch.Tensor) -> float:
    """FAB: unweighted mean over regions of the mean selector bits; (R, n_sel) in."""
    if region_bits.numel() == 0:
        return 32.0
    return float(region_bits.double().mean(dim=1).mean())
