"""Inference modes shared by every backbone: ``fp32``, ``w8a8``/``w8a6``/``w8a4`` and ``dynamic``."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import CadyqError

__all__ = ["QuantMode", "MODES", "CANDIDATE_BITS", "parse_mode"]

CANDIDATE_BITS: tuple[int, int, int] = (4, 6, 8)


@dataclass(frozen=True)
class QuantMode:
    """How a model runs.

    Attributes:
        name: ``fp32``, ``w8a8``, ``w8a6``, ``w8a4`` or ``dynamic``.
        weight_bits: 8, or None for full precision.
        act_bits: fixed activation bits for every bit selector (4, 6, 8), or None for
            full precision (``fp32``) or per-region selection (``dynamic``).
    """

    name: str
    weight_bits: int | None
    act_bits: int | None

    @property
    def quantized(self) -> bool:
        """True unless the model runs in full precision."""
        return self.weight_bits is not None

    @property
    def dynamic(self) -> bool:
        """True when the bit selectors choose bits from the content."""
        return self.name == "dynamic"


MODES: dict[str, QuantMode] = {
    "fp32": QuantMode("fp32", None, None),
    "w8a8": QuantMode("w8a8", 8, 8),
    "w8a6": QuantMode("w8a6", 8, 6),
    "w8a4": QuantMode("w8a4", 8, 4),
    "dynamic": QuantMode("dynamic", 8, None),
}


def parse_mode(name: str | QuantMode) -> QuantMode:
    """Return the :class:`QuantMode` called ``name``; raise CadyqError for an unknown name."""
    if isinstance(name, QuantMode):
        return name
    try:
        return MODES[name]
    except KeyError:
        raise CadyqError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}") from None
