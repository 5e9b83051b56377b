"""Exponential moving average of a model's weights (``cadyq train --ema DECAY``).

After every optimizer step each float tensor of the model's state dict (parameters and
persistent buffers: weights, quantizer clips ``alpha``/``max_val``, selector weights) is averaged
as ``ema = d * ema + (1 - d) * w`` with the warm-up decay ``d = min(decay, (1 + n) / (10 + n))``
at the stage's ``n``-th step: early on the average follows the weights closely, so it does not
stay anchored to the stage's starting point for ``1 / (1 - decay)`` steps. Training goes on with
the raw weights; validation and the checkpoint's ``model`` use the average
(:meth:`WeightEMA.applied`). The tensors live in the model's own layout (selectors in their
standardized form while training), so they are folded for a checkpoint like the raw weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["WeightEMA", "ema_decay"]


def ema_decay(decay: float, step: int) -> float:
    """The decay used at optimizer step ``step`` (1 for the first): ``decay`` with its warm-up."""
    return min(decay, (1 + step) / (10 + step))


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float tensors of ``model``'s state dict (views of its parameters and buffers)."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


class WeightEMA:
    """The moving average of ``model``'s float weights, starting as a copy of them."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in _float_state(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average in ``model``'s current weights after optimizer step ``step`` (1 for the first)."""
        d = ema_decay(self.decay, step)
        for k, v in _float_state(model).items():
            self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors, by state-dict key (what a checkpoint keeps for an exact resume)."""
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Put saved averages back (the keys must be this model's float state-dict keys)."""
        if sd.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - sd.keys()) or sorted(sd.keys() - self.shadow.keys())
            raise SystemExit(f"the saved weight average does not fit the model (e.g. {missing[0]})")
        for k, v in sd.items():
            self.shadow[k].copy_(v)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``model`` holds the averaged weights; its raw ones come back after it."""
        own = _float_state(model)
        raw = {k: v.detach().clone() for k, v in own.items()}
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(self.shadow[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in own.items():
                    v.copy_(raw[k])
