"""IDN with CADyQ bit selectors (Hui et al. 2018; Hong et al. 2022).

A feature block (two 8-bit convs, each preceded by a fixed 8-bit quantizer; the first acts
on the raw 0..255 image), four distillation blocks (DBlocks) and a transposed conv whose
output is added to the bicubic upscale of the input. Each DBlock has six 8-bit convs, each
preceded by a selector: an enhancement top (64 -> 48 -> 32 (groups 4) -> 64), a channel
split 48/16, an enhancement bottom on the 48 channels (48 -> 64 -> 48 (groups 4) -> 80), and a
1x1 compression of ``bottom + concat(input, split-off 16)``. LeakyReLU slope 0.05. Input and
output 0..255, no mean shift (spec §6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatchError
from ..quant.modules import ActQuantizer, BitSelector, QuantContext, QuantConv2d
from ._base import SRModel
from ._registry import register_model
from ._pams import convert_pams_quantizers, count_blocks, present_prefix, strip_module_prefix

__all__ = ["IDN", "FBlock", "DBlock", "pams_to_cadyq", "is_pams_state_dict"]

_SLOPE = 0.05


def _run(seq: nn.Sequential, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:
    """Apply a Sequential whose BitSelectors need the quantization context."""
    for m in seq:
        x = m(x, ctx) if isinstance(m, BitSelector) else m(x)
    return x


class FBlock(nn.Module):
    """Feature extraction: Q_8, conv 3->64, LReLU, Q_8, conv 64->64, LReLU.

    The two fixed quantizers are registered twice, as ``quant_actf1``/``quant_actf2`` and as
    ``module.0``/``module.3`` (the same objects), so the state dict carries both official names.

    Args:
        n_feats: feature channels (64).
    """

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.quant_actf1 = ActQuantizer(8, alpha=255.0)  # acts on the raw 0..255 image
        self.quant_actf2 = ActQuantizer(8)
        self.module = nn.Sequential(
            self.quant_actf1,
            QuantConv2d(3, n_feats, 3, padding=1),
            nn.LeakyReLU(_SLOPE),
            self.quant_actf2,
            QuantConv2d(n_feats, n_feats, 3, padding=1),
            nn.LeakyReLU(_SLOPE),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.module(x)


def _enhancement(c_in: int, c_mid: int, c_mid2: int, c_out: int, groups: int) -> nn.Sequential:
    """[sel, conv, LReLU] x 3 with the middle conv grouped."""
    seq = nn.Sequential(
        BitSelector(c_in),
        QuantConv2d(c_in, c_mid, 3, padding=1),
        nn.LeakyReLU(_SLOPE),
        BitSelector(c_mid),
        QuantConv2d(c_mid, c_mid2, 3, padding=1, groups=groups),
        nn.LeakyReLU(_SLOPE),
        BitSelector(c_mid2),
        QuantConv2d(c_mid2, c_out, 3, padding=1),
        nn.LeakyReLU(_SLOPE),
    )
    seq[3].inplace = seq[6].inplace = True  # LReLU outputs nobody reads again
    return seq


class DBlock(nn.Module):
    """IDN distillation block with six selectors; the 1x1 compression is full precision.

    Args:
        n_feats: feature channels D3 (64).
        d: distillation increment (16).
        s: split factor (4); the top output is split at ``int(n_feats - n_feats / s)``.
    """

    def __init__(self, n_feats: int = 64, d: int = 16, s: int = 4) -> None:
        super().__init__()
        self.split = int(n_feats - n_feats / s)
        self.enhancement_top = _enhancement(n_feats, n_feats - d, n_feats - 2 * d, n_feats, groups=4)
        self.enhancement_bottom = _enhancement(self.split, n_feats, n_feats - d, n_feats + d, groups=4)
        self.compression = nn.Conv2d(n_feats + d, n_feats, 1)

    def forward(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:  # noqa: D102
        u = _run(self.enhancement_top, x, ctx)
        s1, s2 = u[:, : self.split], u[:, self.split :]
        v = _run(self.enhancement_bottom, s1, ctx)
        return self.compression(v + torch.cat([x, s2], dim=1))


@register_model
class IDN(SRModel):
    """IDN (4 DBlocks, 64 features, d = 16, s = 4) with 24 CADyQ selectors.

    The state dict does not depend on the scale; only the transposed conv's stride does.

    Args:
        scale: 2, 3 or 4.
        n_feats: feature channels (64).
        n_dblocks: distillation blocks (4; the official PAMS model hard-codes 4).
    """

    arch = "idn"
    receptive_radius = 32  # fblock 2 + 4 x 6 DBlock convs + deconv <= 5 + bicubic 2 (LR px), rounded up

    def __init__(self, scale: int = 4, n_feats: int = 64, n_dblocks: int = 4) -> None:
        super().__init__(scale)
        self.fblock = FBlock(n_feats)
        self.dblocks = nn.ModuleList([DBlock(n_feats) for _ in range(n_dblocks)])
        self.deconv = nn.ConvTranspose2d(n_feats, 3, 17, stride=scale, padding=8)

    def feature_blocks(self) -> list[nn.Module]:
        """DBlocks whose outputs the attention-transfer loss compares."""
        return list(self.dblocks)

    def forward_features(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:  # noqa: D102
        h, w = x.shape[2:]
        size = (h * self.scale, w * self.scale)
        bic = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        r = self.fblock(x)
        for blk in self.dblocks:
            r = blk(r, ctx)
        return bic + self.fp_precision(lambda t: self.deconv(t, output_size=list(size)))(r)


def is_pams_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """True if ``sd`` is an official IDN_PAMS state dict (fixed 8-bit quantizers, no selectors)."""
    sd = strip_module_prefix(sd)
    return "dblocks.0.enhancement_top.0.alpha" in sd or "dblocks.0.quant_act1.alpha" in sd


def pams_to_cadyq(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official IDN_PAMS state dict to IDN-CADyQ keys (spec §2.3).

    ``dblocks.{d}.enhancement_{top,bottom}.{0,3,6}`` (fixed Q_8) become the three candidates
    of the selectors of the same name; the aliases ``dblocks.{d}.quant_act1..6`` are dropped;
    ``fblock.*`` keeps its names; every selector gets the fresh 8-bit head.

    Args:
        sd: the PAMS state dict (a ``module.`` prefix on every key is tolerated).

    Returns:
        A state dict that :class:`IDN` loads with ``strict=True``.

    Raises:
        CheckpointMismatchError: sd is not an IDN_PAMS state dict.
    """
    sd = strip_module_prefix(sd)
    if not is_pams_state_dict(sd):
        raise CheckpointMismatchError("not an IDN PAMS state dict (no dblocks.0.enhancement_top.0.alpha)")
    moves: dict[str, tuple[str, int]] = {}
    aliases: list[str] = []
    for d in range(count_blocks(sd, "dblocks.{}.compression.weight")):
        for k, part in enumerate(("top", "bottom")):
            p = f"dblocks.{d}.enhancement_{part}"
            # channels of each selector's input: in-channels of conv .1, out-channels of .1 and .4
            channels = (
                int(sd[f"{p}.1.weight"].shape[1]),
                int(sd[f"{p}.1.weight"].shape[0]),
                int(sd[f"{p}.4.weight"].shape[0]),
            )
            for j, (pos, ch) in enumerate(zip((0, 3, 6), channels)):
                alias = f"dblocks.{d}.quant_act{3 * k + j + 1}"
                moves[present_prefix(sd, f"{p}.{pos}", alias)] = (f"{p}.{pos}", ch)
                aliases.append(alias)
    return convert_pams_quantizers(sd, moves, aliases)
