"""Shared pieces of the official PAMS -> CADyQ conversion (spec §2.3), used by every backbone."""
from __future__ import annotations

import torch

from ..errors import CheckpointMismatchError

__all__ = ["strip_module_prefix", "convert_pams_quantizers", "present_prefix", "count_blocks"]


def strip_module_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DataParallel ``module.`` prefix when every key carries it."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def convert_pams_quantizers(
    sd: dict[str, torch.Tensor],
    moves: dict[str, tuple[str, int]],
    aliases: list[str],
) -> dict[str, torch.Tensor]:
    """Shared PAMS -> CADyQ renaming (spec §2.3), used by every backbone's ``pams_to_cadyq``.

    Args:
        sd: PAMS state dict (keys without ``module.``).
        moves: PAMS quantizer prefix -> (selector prefix, channels C of the quantized tensor).
            The quantizer's ``alpha`` and ``max_val`` are copied to ``quant_bit1/2/3`` of the
            selector, and the selector gets the official fresh head (``net_small.0.weight`` all
            ones [3, C+2], bias (0, 0, 1)), so the result loads strictly and runs at 8 bits.
        aliases: module prefixes whose keys are dropped (second names of moved quantizers).

    Returns:
        A new state dict with CADyQ key names.

    Raises:
        CheckpointMismatchError: a quantizer named in ``moves`` is missing from ``sd``.
    """
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for src, (dst, channels) in moves.items():
        for leaf in ("alpha", "max_val"):
            key = f"{src}.{leaf}"
            if key not in sd:
                raise CheckpointMismatchError(f"PAMS state dict lacks {key!r}; is it the right architecture?")
            consumed.add(key)
            for j in (1, 2, 3):
                out[f"{dst}.quant_bit{j}.{leaf}"] = sd[key].detach().clone()
        out[f"{dst}.net_small.0.weight"] = torch.ones(3, channels + 2)
        out[f"{dst}.net_small.0.bias"] = torch.tensor([0.0, 0.0, 1.0])
    prefixes = tuple(a + "." for a in aliases)
    for k, v in sd.items():
        if k in consumed or k.startswith(prefixes):
            continue
        out[k] = v
    return out


def present_prefix(sd: dict[str, torch.Tensor], primary: str, alias: str) -> str:
    """``primary`` if ``primary.alpha`` is in sd, else ``alias`` (for files that kept only one name)."""
    return primary if f"{primary}.alpha" in sd or f"{alias}.alpha" not in sd else alias


def count_blocks(sd: dict[str, torch.Tensor], pattern: str) -> int:
    """Number of consecutive i = 0, 1, ... for which ``pattern.format(i)`` is a key of sd."""
    n = 0
    while pattern.format(n) in sd:
        n += 1
    return n
