"""Quantization: modes (values), pure primitives, regions, integer kernels, quantized modules, kernel choice and cost accounting."""
from __future__ import annotations

from .modes import MODES, QuantMode, parse_mode
from .modules import ActQuantizer, BitSelector, QuantContext, QuantConv2d, set_quant_mode
from .regions import RegionGrid
from .primitives import fake_quant_act, fake_quant_weight, qmax_for_bits

__all__ = [
    "MODES",
    "QuantMode",
    "parse_mode",
    "set_quant_mode",
    "ActQuantizer",
    "BitSelector",
    "QuantContext",
    "QuantConv2d",
    "RegionGrid",
    "fake_quant_act",
    "fake_quant_weight",
    "qmax_for_bits",
]
