"""What a training step minimizes: L1 to the HR image, L1 to the teacher's output (distillation),
the expected bits (cadyq, ramped in) and attention transfer between residual blocks (cadyq)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models._base import SRModel
from .config import TrainConfig

__all__ = ["AttentionTaps", "stage_loss"]


def _block_outputs(model: SRModel, only_training: bool = True) -> tuple[list[torch.Tensor], list]:
    """Register hooks collecting the outputs of the model's residual blocks (for AT loss).

    ``only_training``: collect only while ``model.training`` (validation must not pile up
    every tile's features); the teacher runs in eval mode and collects always.
    """
    feats: list[torch.Tensor] = []
    handles = []

    def hook(m: torch.nn.Module, i: object, o: torch.Tensor) -> None:
        if model.training or not only_training:
            feats.append(o)

    for blk in model.feature_blocks():  # type: ignore[attr-defined]
        handles.append(blk.register_forward_hook(hook))
    return feats, handles


def _attention(f: torch.Tensor) -> torch.Tensor:
    a = f.float().pow(2).mean(dim=1).flatten(1)
    return F.normalize(a, dim=1)


class AttentionTaps:
    """The residual blocks' outputs of a student and its teacher, collected by forward hooks during
    each training step, for the attention-transfer loss. :meth:`remove` takes the hooks off."""

    def __init__(self, student: SRModel, teacher: SRModel) -> None:
        self.student, h1 = _block_outputs(student)
        self.teacher, h2 = _block_outputs(teacher, only_training=False)
        self._handles = h1 + h2

    def clear(self) -> None:
        """Forget the previous step's features."""
        self.student.clear()
        self.teacher.clear()

    def loss(self) -> torch.Tensor:
        """Mean squared difference of the normalized spatial attention maps, summed over blocks."""
        return sum((_attention(a) - _attention(b)).pow(2).mean() for a, b in zip(self.student, self.teacher))  # type: ignore[return-value]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def stage_loss(cfg: TrainConfig, step: int, model: SRModel, sr: torch.Tensor, y: torch.Tensor,
               t_out: torch.Tensor | None, bits: torch.Tensor,
               taps: AttentionTaps | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one training step of stage ``cfg.stage`` and its detached parts (for the log).

    ``sr``: the student's float32 output for HR target ``y``; ``t_out``: the teacher's (or
    ``None``); ``bits``: the bits the student chose (cadyq); ``model``: the student, for the
    expected bits of this forward; ``taps``: the block features for attention transfer (or ``None``).
    """
    loss_l1 = F.l1_loss(sr, y)
    loss = loss_l1
    parts = {"l1": loss_l1.detach()}  # tensors: read (a device sync) only when logged
    if t_out is not None and cfg.distill_weight > 0:
        ld = F.l1_loss(sr, t_out.float())
        loss = loss + cfg.distill_weight * ld
        parts["distill"] = ld.detach()
    if cfg.stage == "cadyq":
        lb = model.soft_bits().mean()  # (N, n_sel) expected bits
        wb = cfg.bit_weight_max * min(1.0, step / max(cfg.bit_ramp_steps, 1))
        # with a budget only the batch's expected bits above it cost (evaluation FAB may differ): a cap, not a
        # push to 4 bits everywhere
        loss = loss + wb * (lb if cfg.bit_target is None else F.relu(lb - cfg.bit_target))
        parts["soft_bits"] = lb.detach()
        parts["fab"] = bits.detach().float().mean()
        if taps is not None:
            la = taps.loss()
            loss = loss + cfg.at_weight * la
            parts["at"] = la.detach()
    return loss, parts
