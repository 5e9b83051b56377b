"""SRResNet with CADyQ bit selectors (Ledig et al. 2017; Hong et al. 2022).

16 residual blocks of 64 features with BatchNorm and one PReLU slope shared by the head and
every block. Per block: selector ``classify1`` quantizes the block input for the *skip
only* (conv1 reads the unquantized input, spec §6 / §9.4), 8-bit conv1, BN, PReLU, selector
``classify2`` on the conv2 input, 8-bit conv2, BN; ``r = t + s``. Head (9x9), body end
conv, upsampler and tail (9x9) are full precision and have no bias. Input and output are
0..255 with no mean shift: ``sub_mean``/``add_mean`` exist in the state dict but are unused.

Only x2 and x4: the official x3 upsampler is empty (spec §9.9), so x3 is rejected.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointMismatchError
from ..quant.modules import InputConv2d, BitSelector, QuantContext, QuantConv2d
from ._base import MeanShift, PixelShuffle, SRModel
from ._registry import register_model
from ._pams import convert_pams_quantizers, count_blocks, strip_module_prefix

__all__ = ["SRResNet", "SRResBlock", "pams_to_cadyq", "is_pams_state_dict"]


class SRResBlock(nn.Module):
    """SRResNet residual block with two selectors; the skip adds the *quantized* input.

    Args:
        n_feats: feature channels (64).
        act: the PReLU shared with the head and every other block (registered as ``act``).
        res_scale: residual scaling (1).
    """

    def __init__(self, n_feats: int, act: nn.PReLU, res_scale: float = 1.0) -> None:
        super().__init__()
        self.classify1 = BitSelector(n_feats)
        self.classify2 = BitSelector(n_feats)
        self.classify2.inplace = True  # conv1's activation, read only here (classify1's input feeds conv1)
        self.conv1 = QuantConv2d(n_feats, n_feats, 3, padding=1)
        self.conv2 = QuantConv2d(n_feats, n_feats, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(n_feats)
        self.act = act
        self.bn2 = nn.BatchNorm2d(n_feats)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:  # noqa: D102
        s = self.classify1(x, ctx)
        t = self.act(self.bn1(self.conv1(x)))
        t = self.classify2(t, ctx)
        t = self.bn2(self.conv2(t)) * self.res_scale
        return t + s


class _Upsampler(nn.Sequential):
    """[conv (no bias), PS(2), PReLU] once for x2, twice for x4."""

    def __init__(self, scale: int, n_feats: int) -> None:
        layers: list[nn.Module] = []
        for _ in range(scale // 2):
            layers += [nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1, bias=False), PixelShuffle(2), nn.PReLU()]
        super().__init__(*layers)


@register_model
class SRResNet(SRModel):
    """SRResNet (16 blocks, 64 features, BatchNorm) with 32 CADyQ selectors.

    BatchNorm follows the module's train/eval state; inference (``eval()``) uses the running
    statistics as the official test code does.

    Args:
        scale: 2 or 4.
        n_resblocks: residual blocks (16).
        n_feats: feature channels (64).
    """

    arch = "srresnet"
    supported_scales = (2, 4)
    receptive_radius = 48  # head 4 + 32 body convs + body end 1 + upsampler/tail <= 4 (LR px), rounded up

    def __init__(self, scale: int = 4, n_resblocks: int = 16, n_feats: int = 64) -> None:
        super().__init__(scale)
        self.sub_mean = MeanShift(255.0, -1)  # kept for the official key set; never called
        self.add_mean = MeanShift(255.0, +1)
        act = nn.PReLU()
        self.head = nn.Sequential(InputConv2d(3, n_feats, 9, padding=4, bias=False), act)
        self.body = nn.Sequential(
            *[SRResBlock(n_feats, act) for _ in range(n_resblocks)],
            nn.Conv2d(n_feats, n_feats, 3, padding=1, bias=False),
            nn.BatchNorm2d(n_feats),
        )
        self.tail = nn.Sequential(_Upsampler(scale, n_feats), nn.Conv2d(n_feats, 3, 9, padding=4, bias=False))

    def feature_blocks(self) -> list[nn.Module]:
        """Residual blocks whose outputs the attention-transfer loss compares."""
        return list(self.body[:-2])

    def forward_features(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:  # noqa: D102
        h = self.head(x)
        r = h
        for blk in self.body[:-2]:
            r = blk(r, ctx)
        r = self.body[-1](self.body[-2](r)) + h
        return self.run_tail(r, self.tail, halo=4)


def is_pams_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """True if ``sd`` is an official SRResNet_PAMS state dict (fixed 8-bit quantizers, no selectors)."""
    sd = strip_module_prefix(sd)
    return "body.0.quant_act1.alpha" in sd and "body.0.conv1.weight" in sd


def pams_to_cadyq(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official SRResNet_PAMS state dict to SRResNet-CADyQ keys (spec §2.3).

    ``body.{i}.quant_act1`` / ``quant_act2`` become the three candidates of
    ``body.{i}.classify1`` / ``classify2``; every selector gets the fresh 8-bit head. The
    shared PReLU aliases (``body.{i}.act.weight``) exist in both formats and are kept.

    Args:
        sd: the PAMS state dict (a ``module.`` prefix on every key is tolerated).

    Returns:
        A state dict that :class:`SRResNet` loads with ``strict=True``.

    Raises:
        CheckpointMismatchError: sd is not an SRResNet_PAMS state dict.
    """
    sd = strip_module_prefix(sd)
    if not is_pams_state_dict(sd):
        raise CheckpointMismatchError("not an SRResNet PAMS state dict (no body.0.quant_act1.alpha)")
    n_feats = int(sd["head.0.weight"].shape[0])
    moves: dict[str, tuple[str, int]] = {}
    for i in range(count_blocks(sd, "body.{}.quant_act1.alpha")):
        moves[f"body.{i}.quant_act1"] = (f"body.{i}.classify1", n_feats)
        moves[f"body.{i}.quant_act2"] = (f"body.{i}.classify2", n_feats)
    return convert_pams_quantizers(sd, moves, [])
