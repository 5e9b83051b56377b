"""CARN with CADyQ bit selectors (Ahn et al. 2018; Hong et al. 2022).

Multi-scale CARN: an entry conv, three cascading blocks of three residual units (each
block and the whole body cascade through 1x1 convs), one upsampler per scale (x2, x3, x4,
all in the same state dict) and an exit conv. Per residual unit: a selector on the conv1
input, 8-bit conv, ReLU, a selector on the conv2 input, 8-bit conv; the skip adds the
*unquantized* unit input (spec §6). Everything else is full precision.

The network works on 0..1 images: :meth:`CARN.forward_features` divides the 0..255 input
by 255 and multiplies the output by 255, and the gradient feature is not scaled by 1000
(``grad_multiplier = 1``, spec §5.1 step 6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointMismatchError
from ..quant.modules import InputConv2d, BitSelector, QuantContext, QuantConv2d
from ._base import MeanShift, PixelShuffle, SRModel
from ._registry import register_model
from ._pams import convert_pams_quantizers, present_prefix, strip_module_prefix

__all__ = ["CARN", "ResidualUnit", "CascadingBlock", "pams_to_cadyq", "is_pams_state_dict"]

_N_BLOCKS = 3  # cascading blocks b1..b3 (fixed, spec §1)
_N_UNITS = 3  # residual units per block


class _Shift(nn.Module):
    """Mean shift on the 0..1 scale, stored as ``<name>.shifter`` like the official CARN."""

    def __init__(self, sign: int) -> None:
        super().__init__()
        self.shifter = MeanShift(1.0, sign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.shifter(x)


class _ConvReLU(nn.Module):
    """1x1 conv + ReLU, stored as ``<name>.body.0`` (CARN's cascade fusion conv)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.body(x)


class ResidualUnit(nn.Module):
    """CARN residual unit: ``ReLU(conv(sel(ReLU(conv(sel(x))))) + x)`` with an FP skip.

    Args:
        n_feats: feature channels (64).
    """

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            BitSelector(n_feats),
            QuantConv2d(n_feats, n_feats, 3, padding=1),
            nn.ReLU(inplace=True),
            BitSelector(n_feats),
            QuantConv2d(n_feats, n_feats, 3, padding=1),
        )
        self.body[3].inplace = True  # a ReLU output nobody reads again (body.0's input is the skip)
        self.body[3].after_relu = True

    def forward(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:  # noqa: D102
        t = self.body[2](self.body[1](self.body[0](x, ctx)))
        t = self.body[4](self.body[3](t, ctx))
        return F.relu(t + x)


def _cascade(x: torch.Tensor, units: list[nn.Module], fuse: list[nn.Module], ctx: QuantContext) -> torch.Tensor:
    """CARN cascade: c = x, o = x; for each k: c = cat(c, unit_k(o)), o = fuse_k(c)."""
    c = o = x
    for unit, fuse_k in zip(units, fuse):
        c = torch.cat([c, unit(o, ctx)], dim=1)
        o = fuse_k(c)
    return o


class CascadingBlock(nn.Module):
    """Three residual units ``b1..b3`` cascaded through the 1x1 convs ``c1..c3``.

    Args:
        n_feats: feature channels (64).
    """

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.b1 = ResidualUnit(n_feats)
        self.b2 = ResidualUnit(n_feats)
        self.b3 = ResidualUnit(n_feats)
        self.c1 = _ConvReLU(2 * n_feats, n_feats)
        self.c2 = _ConvReLU(3 * n_feats, n_feats)
        self.c3 = _ConvReLU(4 * n_feats, n_feats)

    def units(self) -> list[ResidualUnit]:
        """The residual units in forward order."""
        return [self.b1, self.b2, self.b3]

    def forward(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:  # noqa: D102
        return _cascade(x, self.units(), [self.c1, self.c2, self.c3], ctx)


class _UpsampleStage(nn.Module):
    """CARN upsampler for one scale: [conv, ReLU, PS] once (x2, x3) or twice (x4), in ``body``."""

    def __init__(self, scale: int, n_feats: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if scale in (2, 4):
            for _ in range(scale // 2):
                layers += [nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1), nn.ReLU(inplace=True), PixelShuffle(2)]
        else:
            layers += [nn.Conv2d(n_feats, 9 * n_feats, 3, padding=1), nn.ReLU(inplace=True), PixelShuffle(3)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.body(x)


class _MultiScaleUpsample(nn.Module):
    """The three upsamplers ``up2``, ``up3``, ``up4`` of the multi-scale model."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.up2 = _UpsampleStage(2, n_feats)
        self.up3 = _UpsampleStage(3, n_feats)
        self.up4 = _UpsampleStage(4, n_feats)

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:  # noqa: D102
        return {2: self.up2, 3: self.up3, 4: self.up4}[scale](x)


@register_model
class CARN(SRModel):
    """Multi-scale CARN (3x3 residual units, 64 features) with 18 CADyQ selectors.

    One model (one state dict) holds the x2, x3 and x4 upsamplers; ``self.scale`` picks the
    one used by forward.

    Args:
        scale: 2, 3 or 4.
        n_feats: feature channels (64).
    """

    arch = "carn"
    grad_multiplier = 1.0
    multi_scale = True
    receptive_radius = 24  # entry 1 + 18 unit convs + upsampler/exit <= 3 (LR px), rounded up

    def __init__(self, scale: int = 4, n_feats: int = 64) -> None:
        super().__init__(scale)
        self.sub_mean = _Shift(-1)
        self.add_mean = _Shift(+1)
        self.entry = InputConv2d(3, n_feats, 3, padding=1)
        self.b1 = CascadingBlock(n_feats)
        self.b2 = CascadingBlock(n_feats)
        self.b3 = CascadingBlock(n_feats)
        self.c1 = _ConvReLU(2 * n_feats, n_feats)
        self.c2 = _ConvReLU(3 * n_feats, n_feats)
        self.c3 = _ConvReLU(4 * n_feats, n_feats)
        self.upsample = _MultiScaleUpsample(n_feats)
        self.exit = nn.Conv2d(n_feats, 3, 3, padding=1)

    def feature_blocks(self) -> list[nn.Module]:
        """The nine residual units (forward order) whose outputs the attention-transfer loss compares."""
        return [u for blk in (self.b1, self.b2, self.b3) for u in blk.units()]

    def forward_features(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:  # noqa: D102
        h = self.entry(self.sub_mean(x / 255.0))
        o = _cascade(h, [self.b1, self.b2, self.b3], [self.c1, self.c2, self.c3], ctx)
        return self.run_tail(o, lambda t: self.add_mean(self.exit(self.upsample(t, self.scale))) * 255.0)


def is_pams_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """True if ``sd`` is an official CARN_PAMS state dict (fixed 8-bit quantizers, no selectors)."""
    sd = strip_module_prefix(sd)
    return "b1.b1.body.0.alpha" in sd or "b1.b1.quant_act1.alpha" in sd


def pams_to_cadyq(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official CARN_PAMS state dict to CARN-CADyQ keys (spec §2.3).

    ``b{B}.b{R}.body.0`` and ``.body.3`` (fixed Q_8) become the three candidates of the
    selectors of the same name; their aliases ``b{B}.b{R}.quant_act1/2`` are dropped; every
    selector gets the fresh 8-bit head.

    Args:
        sd: the PAMS state dict (a ``module.`` prefix on every key is tolerated).

    Returns:
        A state dict that :class:`CARN` loads with ``strict=True``.

    Raises:
        CheckpointMismatchError: sd is not a CARN_PAMS state dict.
    """
    sd = strip_module_prefix(sd)
    if not is_pams_state_dict(sd):
        raise CheckpointMismatchError("not a CARN PAMS state dict (no b1.b1.body.0.alpha)")
    n_feats = int(sd["entry.weight"].shape[0])
    moves: dict[str, tuple[str, int]] = {}
    aliases: list[str] = []
    for b in range(1, _N_BLOCKS + 1):
        for r in range(1, _N_UNITS + 1):
            p = f"b{b}.b{r}"
            moves[present_prefix(sd, f"{p}.body.0", f"{p}.quant_act1")] = (f"{p}.body.0", n_feats)
            moves[present_prefix(sd, f"{p}.body.3", f"{p}.quant_act2")] = (f"{p}.body.3", n_feats)
            aliases += [f"{p}.quant_act1", f"{p}.quant_act2"]
    return convert_pams_quantizers(sd, moves, aliases)
