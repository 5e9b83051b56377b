"""A run kept between sessions as one small file (``cadyq train --wip FILE``, under ``weights/wip/``).

At every save of ``<run>/last.pt`` the stage also writes FILE (atomically, replaced in place): a
safetensors file holding the weights training goes on with (``model/<key>``, selectors folded as
in a checkpoint; ``selector_train/<selector>/<field>``, their standardized form), the weight average
when ``--ema`` is on (``ema/<key>``), and in its metadata the stage, step, schedule length, scale,
arch, grid, skip, seconds trained and the whole config. No optimizer state and no RNG state: a
stage that finds no ``last.pt`` but FILE continues from it with a fresh Adam (its moments restart,
as at ``--init``) and its RNGs reseeded from ``seed + step``, so it is not bit-identical to an
uninterrupted run.

With ``--wip-lean`` (``lean``) the file is half that size, a quarter with ``--ema``, for models whose
file would not fit the repository's budget: the weights are stored as float16 (where they fit that
range; the selectors' small training form stays float32), and with ``--ema`` only the average is kept
(folded like the weights, no ``ema/``), so training goes on from the average and the average starts
again from there.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import fits, save_state_dict
from ..models._base import SRModel
from .config import TrainConfig
from .ema import WeightEMA
from .state import WIP_FORMAT, averaged_weights, read_wip, weights_state  # the reader lives with load_state

__all__ = ["WIP_FORMAT", "save_wip", "read_wip"]


def save_wip(path: str | Path, model: SRModel, ema: WeightEMA | None, step: int, cfg: TrainConfig,
             elapsed_s: float) -> None:
    """Write the --wip file ``path`` (atomically: a temporary file, then a rename); lean with ``cfg.wip_lean``."""
    if cfg.wip_lean and ema is not None:
        sd, sel_train = averaged_weights(model, ema)
        w = {"model": sd, "selector_train": sel_train}
    else:
        w = weights_state(model, ema)
    tensors = {f"model/{k}": v for k, v in w.get("raw_model", w["model"]).items()}
    tensors |= {f"selector_train/{name}/{f}": v for name, t in w["selector_train"].items() for f, v in t.items()}
    tensors |= {f"ema/{k}": v for k, v in (w.get("ema") or {}).items()}
    if cfg.wip_lean:  # the selectors' training form (feature statistics in the thousands) stays float32: tiny
        tensors = {k: v if k.startswith("selector_train/") else _half(v) for k, v in tensors.items()}
    meta = {"format": WIP_FORMAT, "stage": cfg.stage, "arch": cfg.arch, "scale": str(cfg.scale), "step": str(step),
            "steps": str(cfg.steps), "act_grid": cfg.act_grid or "signed", "skip": cfg.skip or "official",
            "elapsed_s": repr(float(elapsed_s)), "config": json.dumps(asdict(cfg))}
    if cfg.wip_lean:
        meta["lean"] = "float16, the average only" if ema is not None else "float16"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(tensors, path, meta)


def _half(v: torch.Tensor) -> torch.Tensor:
    """``v`` as float16 where it is a float32 tensor that fits (:func:`cadyq_cli.checkpoint.fits`), else unchanged."""
    return v.half() if v.dtype == torch.float32 and fits(v, torch.float16) else v
