"""One explicit registry of backbones: ``@register_model`` on each architecture class."""
from __future__ import annotations

import difflib
from typing import Callable, TypeVar

from ..errors import UnknownModelError

__all__ = ["register_model", "create_model", "list_archs", "get_arch", "ARCH_ALIASES"]

_ARCHS: dict[str, type] = {}
T = TypeVar("T", bound=type)

#: Other names accepted on the command line.
ARCH_ALIASES = {"edsr": "edsr_baseline", "edsr-baseline": "edsr_baseline", "edsr_baseline": "edsr_baseline"}


def register_model(cls: T) -> T:
    """Class decorator: register an :class:`SRModel` subclass under its ``arch`` name."""
    _ARCHS[cls.arch] = cls  # type: ignore[attr-defined]
    return cls


def list_archs() -> list[str]:
    """Registered architecture names."""
    return sorted(_ARCHS)


def get_arch(name: str) -> type:
    """Return the class registered as ``name`` (aliases accepted)."""
    key = ARCH_ALIASES.get(name.lower(), name.lower())
    if key not in _ARCHS:
        close = difflib.get_close_matches(name, list(_ARCHS) + list(ARCH_ALIASES), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_archs())}"
        raise UnknownModelError(f"unknown architecture {name!r}{hint}")
    return _ARCHS[key]


def create_model(arch: str, scale: int, **kwargs: object) -> object:
    """Build a backbone with random weights.

    Example:
        >>> m = create_model("edsr", scale=4)
    """
    cls: Callable[..., object] = get_arch(arch)
    return cls(scale=scale, **{k: v for k, v in kwargs.items() if v is not None})
