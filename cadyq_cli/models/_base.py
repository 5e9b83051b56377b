"""What every backbone shares: input convention, gradient feature, mean shift, forward contract."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedScaleError
from ..quant.modes import MODES, QuantMode
from ..quant.modules import BitSelector, QuantContext, RegionGrid, region_mean

__all__ = ["SRModel", "MeanShift", "grad_feature", "DIV2K_RGB_MEAN"]

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def grad_feature(x01: torch.Tensor, grid: RegionGrid | None = None) -> torch.Tensor:
    """CADyQ image-gradient feature: mean |Sobel_x|, mean |Sobel_y| of the gray image per region.

    Args:
        x01: (N, 3, H, W) float RGB in [0, 1].
        grid: regions, or None for one region (the whole input) per sample.

    Returns:
        (N, 2, nh, nw) float32, x-then-y order, not yet multiplied by any backbone factor.
    """
    x01 = x01.float()
    gray = (0.299 * x01[:, 0:1] + 0.587 * x01[:, 1:2]) + 0.114 * x01[:, 2:3]
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    k = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(padded)
    g = F.conv2d(padded, k).abs()
    return region_mean(g, grid)


class MeanShift(nn.Conv2d):
    """1x1 conv with identity weight adding ``sign * range * mean`` (stored in the state dict)."""

    def __init__(self, rgb_range: float, sign: int, mean: tuple[float, float, float] = DIV2K_RGB_MEAN) -> None:
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(mean))
        for p in self.parameters():
            p.requires_grad_(False)


class SRModel(nn.Module):
    """Base of the four backbones.

    ``forward(x)`` takes (N, 3, H, W) float32 RGB on the 0..255 scale (each backbone converts
    to its own range internally, e.g. CARN works on 0..1) and returns ``(sr, bits)``:
    sr (N, 3, sH, sW) on the 0..255 scale, not clamped; bits (N, n_selectors) float, the bits
    each selector chose in forward order, or (N, n_selectors, nh, nw) when a region grid is
    given. In ``fp32`` mode bits has zero columns.
    """

    arch: ClassVar[str] = ""
    supported_scales: ClassVar[tuple[int, ...]] = (2, 3, 4)
    grad_multiplier: ClassVar[float] = 1000.0  # EDSR, SRResNet, IDN; CARN uses 1 (spec §5.1)
    #: LR pixels of context a pixel's output depends on (receptive-field radius, generous).
    receptive_radius: ClassVar[int] = 48

    def __init__(self, scale: int) -> None:
        super().__init__()
        if scale not in self.supported_scales:
            raise UnsupportedScaleError(
                f"{self.arch} supports scales {', '.join(map(str, self.supported_scales))}, not x{scale}"
            )
        self.scale = scale
        self.mode: QuantMode = MODES["dynamic"]

    @property
    def selectors(self) -> list[BitSelector]:
        """Bit selectors in forward (call) order."""
        return [m for m in self.modules() if isinstance(m, BitSelector)]

    @property
    def n_selectors(self) -> int:
        """Number of bit selectors (the FAB divisor)."""
        return len(self.selectors)

    def forward_features(self, x: torch.Tensor, ctx: QuantContext) -> torch.Tensor:
        """Backbone forward on the 0..255 input; implemented by each architecture."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, grid: RegionGrid | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Super-resolve a batch; see the class docstring for the contract."""
        grad = grad_feature(x / 255.0, grid) * self.grad_multiplier
        ctx = QuantContext(grad=grad, grid=grid)
        sr = self.forward_features(x, ctx)
        n = x.shape[0]
        nh, nw = grad.shape[2:]
        bits = torch.stack(ctx.bits, dim=1) if ctx.bits else x.new_zeros((n, 0, nh, nw))
        if grid is None:
            bits = bits.reshape(n, -1)
        self._last_soft_bits = ctx.soft_bits
        return sr, bits
