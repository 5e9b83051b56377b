"""Kernel choice: link a model's quantizers to its quantized convs so they run on int8 codes.

The integer kernels themselves (and why they are exact) are in :mod:`cadyq_cli.quant.kernels`.
"""
from __future__ import annotations

from torch import nn

from ..errors import CadyqError
from .cost import cost_table
from .kernels import int8_available
from .modules import ActQuantizer, BitSelector

__all__ = ["int8_available", "set_kernels", "kernels_of"]


def set_kernels(model: nn.Module, kernels: str = "auto") -> str:
    """Choose how ``model``'s quantized convs run: ``int8``, ``float`` or ``auto`` (int8 where available).

    Links every activation quantizer whose output feeds a quantized conv (from the model's
    cost table) so that, at inference, it hands the conv its integer codes. Returns the kernels used.
    """
    if kernels not in ("auto", "int8", "float"):
        raise CadyqError(f"--kernels must be auto, int8 or float, not {kernels!r}")
    use = kernels != "float" and int8_available()
    if kernels == "int8" and not use:
        raise CadyqError("int8 kernels are not available on this machine (they need oneDNN and a CPU with VNNI or AMX)")
    # quantizers whose output is a quantized conv's input (the cost table found them by identity)
    linked = {c.feeder for c in cost_table(model) if c.weight_bits == 8 and c.feeder} if use else set()
    for name, m in model.named_modules():
        if isinstance(m, (BitSelector, ActQuantizer)):
            m.emit_codes = name in linked
    model._kernels = "int8" if use else "float"
    return model._kernels


def kernels_of(model: nn.Module) -> str:
    """The kernels ``model`` currently runs with (``float`` until :func:`set_kernels` is called)."""
    return getattr(model, "_kernels", "float")
