"""Stage starts from data: PAMS clip calibration, and the CADyQ candidate clips and selector
feature statistics, measured on a few training batches."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..models._base import SRModel
from ..quant.modes import CANDIDATE_BITS
from ..quant.modules import ActQuantizer, BitSelector, set_quant_mode
from ..quant.primitives import fake_quant_act, qmax_for_bits
from .config import TrainConfig
from .data import SRPairs

__all__ = ["calibrate", "init_selectors", "mse_clip"]


def _probe_batches(model: SRModel, data: SRPairs, rng: np.random.Generator, cfg: TrainConfig,
                   sel_hook: Callable[[BitSelector, tuple], None], after_batch: Callable[[], None] = lambda: None) -> None:
    """Run ``cfg.calib_batches`` training batches through ``model`` with ``sel_hook`` as a forward
    pre-hook on every bit selector (it sees the selector's input), calling ``after_batch`` after each."""
    handles = [s.register_forward_pre_hook(sel_hook) for s in model.selectors]
    try:
        for _ in range(cfg.calib_batches):
            x, _ = data.sample(rng, cfg.batch, cfg.lr_patch)
            model(x.to(next(model.parameters()).device))
            after_batch()
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(model: SRModel, data: SRPairs, rng: np.random.Generator, cfg: TrainConfig) -> None:
    """PAMS init: every clip value from the mean per-sample max |activation| of FP batches."""
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    set_quant_mode(model, "fp32")
    sums = {id(q): 0.0 for q in quants}

    # In fp32 mode a BitSelector returns its (shifted) input without calling its candidates, so their
    # ``calibrating`` flag would never fire: calibrate them from what they would quantize instead.
    def _sel_hook(sel: BitSelector, inputs: tuple) -> None:
        x = sel.shifted(inputs[0])
        for q in sel.candidates:
            q.calibrate_(x)

    def _collect() -> None:  # each calibrating forward overwrote alpha with its batch's statistic
        for q in quants:
            sums[id(q)] += float(q.alpha)

    for q in quants:
        q.calibrating = True
    _probe_batches(model, data, rng, cfg, _sel_hook, _collect)
    for q in quants:
        q.calibrating = False
        q.alpha.fill_(sums[id(q)] / cfg.calib_batches)
        q.max_val.fill_(sums[id(q)] / cfg.calib_batches)
    set_quant_mode(model, "w8a8")


def mse_clip(x: torch.Tensor, bits: int, grid: int = 64, signed: bool = True) -> float:
    """Clip value alpha minimizing the mean squared error of ``Q_bits(x; alpha)`` on samples x
    (on the signed or the unsigned grid)."""
    qmax = float(qmax_for_bits(bits, signed))
    top = float(x.abs().max())
    alphas = torch.linspace(top / grid, top, grid, device=x.device)
    errs = torch.stack([(fake_quant_act(x, a.reshape(1), qmax, signed=signed) - x).pow(2).mean() for a in alphas])
    return float(alphas[int(errs.argmin())])


@torch.no_grad()
def init_selectors(model: SRModel, data: SRPairs, rng: np.random.Generator, cfg: TrainConfig,
                    log: Callable[[str], None]) -> None:
    """CADyQ stage start: candidate clips and selector feature statistics from w8a8 batches.

    * ``clip_init == "mse"``: the 4- and 6-bit candidates get the clip minimizing their own
      quantization MSE (the official code copies the 8-bit clip into all three, which leaves
      a 4-bit step so coarse that flat, low-amplitude regions lose most, so the selector
      learns to spend bits on them rather than on detail).
    * ``selector_norm``: the selector is trained on standardized features (z - mean) / scale.
      Raw features (gradient x1000, channel stds) are all positive and large, so every
      raw-space update of the linear selector moves high-content patches' logits most, and the
      bit loss alone pushed detailed regions to 4 bits first. Saved checkpoints hold the folded
      raw-feature weights, so the official inference form is unchanged.
    """
    was_training = model.training
    model.eval()
    set_quant_mode(model, "w8a8")
    feats: dict[int, list[torch.Tensor]] = {id(s): [] for s in model.selectors}
    samples: dict[int, list[torch.Tensor]] = {id(s): [] for s in model.selectors}
    gen = torch.Generator().manual_seed(cfg.seed)

    def _hook(sel: BitSelector, inputs: tuple) -> None:
        x, ctx = inputs[0], inputs[1]
        feats[id(sel)].append(sel.features(x.detach(), ctx).flatten(0, 2))  # training patches: one region each
        flat = sel.shifted(x.detach()).float().flatten()  # what the candidates quantize
        samples[id(sel)].append(flat[torch.randint(0, flat.numel(), (100_000,), generator=gen)])

    _probe_batches(model, data, rng, cfg, _hook)
    for i, sel in enumerate(model.selectors):
        if cfg.clip_init == "mse":
            a = torch.cat(samples[id(sel)])
            for q, b in zip(sel.candidates[:2], CANDIDATE_BITS[:2]):
                q.alpha.fill_(mse_clip(a, b, signed=sel.signed))
                q.max_val.copy_(q.alpha[0])
        if cfg.selector_norm:
            z = torch.cat(feats[id(sel)])
            mean = z.mean(0)
            sel.znorm = (mean, z.std(0) + 1e-3 * mean.abs() + 1e-6)
        if i < 2:
            log(f"selector {i}: clips {[round(float(q.alpha), 2) for q in sel.candidates]}")
    set_quant_mode(model, "dynamic")
    model.train(was_training)
