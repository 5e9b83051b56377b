"""EDSR-baseline with CADyQ bit selectors (Lim et al. 2017; Hong et al. 2022).

16 residual blocks of 64 features, res_scale 1. Per block: a selector on the block input
(feeding conv1 *and* the skip, spec §9.4), 8-bit conv, ReLU, a selector on the conv2 input
(a ReLU output: the unsigned grid may be used there, :meth:`SRModel.set_act_grid`),
8-bit conv, a fixed 8-bit quantizer on the residual branch. Head, body end conv, upsampler
and tail stay full precision. Input 0..255 with DIV2K mean subtraction.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointMismatchError
from ..quant.modules import InputConv2d, ActQuantizer, BitSelector, QuantContext, QuantConv2d
from ._base import MeanShift, PixelShuffle, SRModel
from ._pams import count_blocks, present_prefix, strip_module_prefix, convert_pams_quantizers
from ._registry import register_model

__all__ = ["EDSRBaseline", "ResBlock", "Upsampler", "pams_to_cadyq", "is_pams_state_dict"]


class ResBlock(nn.Module):
    """EDSR residual block; the skip adds the *quantized* block input (official semantics), or
    with ``fp_skip`` the full-precision one (the convs read the same quantized input either way)."""

    def __init__(self, n_feats: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.bitsel1 = BitSelector(n_feats)
        self.body = nn.Sequential(
            QuantConv2d(n_feats, n_feats, 3, padding=1),
            nn.ReLU(inplace=True),
            BitSelector(n_feats),
            QuantConv2d(n_feats, n_feats, 3, padding=1),
        )
        self.quant_act3 = ActQuantizer(8)
        # inputs nobody reads again may be quantized in place (bitsel1's input can be the head
        # output, which the global skip still needs)
        self.body[2].inplace = True
        self.body[2].after_relu = True
        self.quant_act3.inplace = True
        self.res_scale = res_scale
        self.fp_skip = False

    def forward(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:  # noqa: D102
        s = self.bitsel1(x, ctx)  # never in place: x is read again by an fp skip (or the global skip)
        t = self.body[1](self.body[0](s))
        t = self.body[3](self.body[2](t, ctx))
        t = self.quant_act3(t * self.res_scale)
        return t + (x if self.fp_skip else s)


class Upsampler(nn.Sequential):
    """Conv + PixelShuffle stages (no activation): x2, x3, or two x2 stages for x4."""

    def __init__(self, scale: int, n_feats: int) -> None:
        layers: list[nn.Module] = []
        if scale in (2, 4):
            for _ in range(scale // 2):
                layers += [nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1), PixelShuffle(2)]
        else:
            layers += [nn.Conv2d(n_feats, 9 * n_feats, 3, padding=1), PixelShuffle(3)]
        super().__init__(*layers)


@register_model
class EDSRBaseline(SRModel):
    """EDSR-baseline (16 blocks, 64 features) with 32 CADyQ selectors.

    Args:
        scale: 2, 3 or 4.
        n_resblocks: residual blocks (16).
        n_feats: feature channels (64).
    """

    arch = "edsr_baseline"
    receptive_radius = 40  # head 1 + 32 body convs + body end 1 + upsampler/tail <= 3 (LR px)
    skips = ("official", "fp")

    def __init__(self, scale: int = 4, n_resblocks: int = 16, n_feats: int = 64) -> None:
        super().__init__(scale)
        self.sub_mean = MeanShift(255.0, -1)
        self.add_mean = MeanShift(255.0, +1)
        self.head = nn.Sequential(InputConv2d(3, n_feats, 3, padding=1))
        self.body = nn.Sequential(*[ResBlock(n_feats) for _ in range(n_resblocks)], nn.Conv2d(n_feats, n_feats, 3, padding=1))
        self.tail = nn.Sequential(Upsampler(scale, n_feats), nn.Conv2d(n_feats, 3, 3, padding=1))

    def set_skip(self, skip: str) -> None:
        """``official``: each block's skip adds its quantized input; ``fp``: the unquantized one."""
        super().set_skip(skip)
        for blk in self.body[:-1]:
            blk.fp_skip = skip == "fp"

    def feature_blocks(self) -> list[nn.Module]:
        """Residual blocks whose outputs the attention-transfer loss compares."""
        return list(self.body[:-1])

    def forward_features(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:  # noqa: D102
        h = self.head(self.sub_mean(x))
        r = h
        for blk in self.body[:-1]:
            r = blk(r, ctx)
        r = self.body[-1](r) + h
        return self.run_tail(r, lambda t: self.add_mean(self.tail(t)))


def is_pams_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """True if ``sd`` is an official EDSR_PAMS state dict (fixed 8-bit quantizers, no selectors)."""
    sd = strip_module_prefix(sd)
    return (
        "body.0.quant_act1.alpha" in sd
        and "body.0.body.0.weight" in sd
        and not any(".bitsel1." in k for k in sd)
    )


def pams_to_cadyq(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official EDSR_PAMS state dict to EDSR-CADyQ keys (spec §2.3).

    ``body.{i}.quant_act1`` becomes the three candidates of ``body.{i}.bitsel1`` and
    ``body.{i}.quant_act2`` those of ``body.{i}.body.2``; the alias ``body.{i}.body.2.*`` is
    dropped; ``quant_act3`` keeps its name; every selector gets the fresh 8-bit head.

    Args:
        sd: the PAMS state dict (a ``module.`` prefix on every key is tolerated).

    Returns:
        A state dict that :class:`EDSRBaseline` loads with ``strict=True``.

    Raises:
        CheckpointMismatchError: sd is not an EDSR_PAMS state dict.
    """
    sd = strip_module_prefix(sd)
    if not is_pams_state_dict(sd):
        raise CheckpointMismatchError("not an EDSR PAMS state dict (no body.0.quant_act1.alpha)")
    n_feats = int(sd["head.0.weight"].shape[0])
    n_blocks = count_blocks(sd, "body.{}.quant_act1.alpha")
    moves: dict[str, tuple[str, int]] = {}
    for i in range(n_blocks):
        moves[f"body.{i}.quant_act1"] = (f"body.{i}.bitsel1", n_feats)
        moves[present_prefix(sd, f"body.{i}.quant_act2", f"body.{i}.body.2")] = (f"body.{i}.body.2", n_feats)
    return convert_pams_quantizers(sd, moves, [f"body.{i}.body.2" for i in range(n_blocks)])
