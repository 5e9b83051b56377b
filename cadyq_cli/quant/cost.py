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
evaluated for any input size. ``ConvCost``, ``bitops`` and ``fab`` live in :mod:`cadyq_cli.accounting`
(no PyTorch) and are re-exported here.
"""
from __future__ import annotations

import torch
from torch import nn

from ..accounting import ConvCost, bitops, fab
from .modules import ActQuantizer, BitSelector, QuantConv2d, set_quant_mode

__all__ = ["ConvCost", "cost_table", "bitops", "fab"]


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
        # its own generator: the global RNG (a training run's Gumbel noise) must not depend on when the table is built
        model(torch.rand(1, 3, probe, probe, generator=torch.Generator().manual_seed(0)).to(dev) * 255)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if old_mode is not None:
            set_quant_mode(model, old_mode)
    model._cadyq_cost_table = rows  # type: ignore[attr-defined]
    return rows
