"""SR backbones with CADyQ quantization, one module per architecture, one registry."""
from __future__ import annotations

from ._base import SRModel, grad_feature
from ._registry import create_model, get_arch, list_archs, register_model
from .carn import CARN
from .edsr import EDSRBaseline
from .idn import IDN
from .srresnet import SRResNet

__all__ = [
    "SRModel",
    "grad_feature",
    "create_model",
    "get_arch",
    "list_archs",
    "register_model",
    "EDSRBaseline",
    "CARN",
    "SRResNet",
    "IDN",
]
