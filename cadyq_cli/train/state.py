"""Training checkpoints (``<run>/last.pt``): model, optimizer, step, RNG and config, written
atomically and restored exactly; read through :func:`cadyq_cli.checkpoint.read_checkpoint`.

With a weight average (``--ema``) a checkpoint's ``model`` is the averaged model (what every reader
of the file takes: export, select, eval, a later ``--init``); the raw weights training goes on
with are ``raw_model`` and the average in its training layout ``ema``, both for an exact resume.
A ``--wip`` file (train/wip.py writes it) is read here too, as the checkpoint it keeps.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import TRAIN_FORMAT, read_checkpoint, read_state_dict, safetensors_metadata
from ..models import create_model
from ..models._base import SRModel
from ..quant.modules import has_act_shifts
from .config import TrainConfig
from .ema import WeightEMA

__all__ = ["save_state", "load_state", "restore_state", "weights_state", "restore_weights", "read_wip", "WIP_FORMAT"]

#: format tag in a --wip file's metadata (written by :func:`cadyq_cli.train.wip.save_wip`)
WIP_FORMAT = "cadyq-wip-1"


def averaged_weights(model: SRModel, ema: WeightEMA) -> tuple[dict, dict]:
    """The weight average as :func:`weights_state` without one would give it: ``model`` (selectors
    folded) and ``selector_train``, on the CPU (copies)."""
    with ema.applied(model):
        sd, sel_train = _folded_state(model)
        return _to_cpu(_clone(sd)), _to_cpu(_clone(sel_train))


def weights_state(model: SRModel, ema: WeightEMA | None = None) -> dict:
    """A checkpoint's weights, on the CPU: ``model`` (selectors folded) and ``selector_train`` (their
    standardized form); with ``ema`` also ``raw_model`` and ``ema``, ``model`` being the average."""
    sd, sel_train = _folded_state(model)
    if ema is None:
        return {"model": _to_cpu(sd), "selector_train": _to_cpu(sel_train)}
    # copies: on the CPU these tensors share the parameters' memory, which the average takes for a moment
    out = {"raw_model": _to_cpu(_clone(sd)), "selector_train": _to_cpu(_clone(sel_train)),
           "ema": _to_cpu(_clone(ema.state_dict()))}
    out["model"] = averaged_weights(model, ema)[0]
    return out


def save_state(path: Path, model: SRModel, opt: torch.optim.Optimizer | None, step: int, cfg: TrainConfig,
               np_rng: np.random.Generator, elapsed_s: float, ema: WeightEMA | None = None) -> None:
    """Write a resumable checkpoint atomically (with the weight average ``ema`` when on)."""
    dev = next(model.parameters()).device
    state = {
        "format": TRAIN_FORMAT,
        "config": asdict(cfg),
        "step": step,
        "elapsed_s": elapsed_s,
        **weights_state(model, ema),
        "optimizer": _to_cpu(opt.state_dict()) if opt is not None else None,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np_rng.bit_generator.state,
        "python_rng": list(random.getstate()[1]),
    }
    if dev.type == "cuda":  # the selectors' Gumbel noise is drawn on the device
        state["cuda_rng"] = torch.cuda.get_rng_state(dev)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict:
    """Load a training checkpoint written by :func:`save_state` (no code execution).

    A ``.safetensors`` file (a shipped backbone, ``weights/backbones/``, or a shipped model) reads as
    ``{"model": tensors, "config": {...}}`` with the stage, arch, scale, grid and skip its metadata
    records, so ``--init`` takes it wherever it takes a checkpoint (weights only: no optimizer state).
    A ``--wip`` file (``weights/wip/``) reads as the checkpoint it keeps, without optimizer and RNG
    state: its ``model`` is the weight average where the run kept one, as in ``last.pt``.
    """
    if safetensors_metadata(path).get("format") == WIP_FORMAT:
        return _wip_checkpoint(path)
    return read_checkpoint(path)


def read_wip(path: str | Path) -> dict:
    """A --wip file as a training state without optimizer and RNG: ``config``, ``step``,
    ``elapsed_s``, ``model`` (the raw weights), ``selector_train`` and ``ema`` (``None`` when off).
    Refused in one line where the file is no --wip file."""
    tensors, meta = read_state_dict(path)
    if meta.get("format") != WIP_FORMAT or "config" not in meta:
        raise SystemExit(f"--wip {path}: not a file written by cadyq train --wip")
    state: dict = {"config": json.loads(meta["config"]), "step": int(meta["step"]),
                   "elapsed_s": float(meta["elapsed_s"]), "model": {}, "selector_train": {}, "ema": {}}
    for key, v in tensors.items():
        part, _, rest = key.partition("/")
        v = v.float() if v.dtype == torch.float16 else v  # a lean file's float16
        if part == "selector_train":
            name, _, field = rest.rpartition("/")
            state["selector_train"].setdefault(name, {})[field] = v
        elif part in ("model", "ema"):
            state[part][rest] = v
        else:
            raise SystemExit(f"--wip {path}: unexpected tensor {key!r}")
    state["ema"] = state["ema"] or None
    return state


def _wip_checkpoint(path: str | Path) -> dict:
    """A --wip file as :func:`load_state` gives a checkpoint: ``model`` the (folded) weight average where the
    file keeps one apart from the raw weights (then ``raw_model`` and ``ema`` as in ``last.pt``)."""
    state = read_wip(path)
    if state["ema"] is None:  # no average, or a lean file, whose weights are the average already
        return state
    cfg = state["config"]
    model: SRModel = create_model(cfg["arch"], int(cfg["scale"]))  # type: ignore[assignment]
    if has_act_shifts(state["model"]):
        model.enable_act_shift()
    restore_weights(state, model)
    ema = WeightEMA(model, float(cfg.get("ema") or 0.0))
    ema.load_state_dict(state["ema"])
    state["raw_model"], state["model"] = state["model"], averaged_weights(model, ema)[0]
    return state


def restore_weights(state: dict, model: SRModel) -> None:
    """Put the raw weights of :func:`weights_state` back (the average, ``state["ema"]``, is the caller's)."""
    model.load_state_dict(state.get("raw_model", state["model"]), strict=True)
    _restore_selector_train(model, state.get("selector_train") or {})


def restore_state(state: dict, model: SRModel, opt: torch.optim.Optimizer, np_rng: np.random.Generator,
                  dev: torch.device) -> tuple[int, float]:
    """Put a checkpoint's raw model, optimizer and RNG states back (an exact resume); return its step
    and the seconds trained so far."""
    restore_weights(state, model)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    np_rng.bit_generator.state = state["numpy_rng"]
    random.setstate((3, tuple(state["python_rng"]), None))
    if dev.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], dev)
    return int(state["step"]), float(state["elapsed_s"])


def _to_cpu(obj: object) -> object:
    """``obj`` with every tensor inside (dicts, lists) on the CPU: checkpoints load anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _clone(obj: dict) -> dict:
    """``obj`` (a dict of tensors, or of dicts of them) with every tensor copied."""
    return {k: _clone(v) if isinstance(v, dict) else v.detach().clone() for k, v in obj.items()}


def _folded_state(model: SRModel) -> tuple[dict, dict]:
    """The model's state dict with every standardized selector folded back to raw features
    (so the checkpoint runs as is), and the standardized parameters for an exact resume."""
    sd = model.state_dict()
    sel_train = {}
    names = {id(m): n for n, m in model.named_modules()}
    for sel in model.selectors:
        if sel.znorm is None:
            continue
        name = names[id(sel)]
        w, b = sel.folded_linear()
        sel_train[name] = {"weight": sd[f"{name}.net_small.0.weight"], "bias": sd[f"{name}.net_small.0.bias"],
                           "mean": sel.znorm[0], "scale": sel.znorm[1]}
        sd[f"{name}.net_small.0.weight"], sd[f"{name}.net_small.0.bias"] = w, b
    return sd, sel_train


def _restore_selector_train(model: SRModel, sel_train: dict) -> None:
    """Undo :func:`_folded_state` after loading a checkpoint (resume)."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, t in sel_train.items():
            sel = mods[name]
            sel.net_small[0].weight.copy_(t["weight"])
            sel.net_small[0].bias.copy_(t["bias"])
            dev = sel.net_small[0].weight.device
            sel.znorm = (t["mean"].to(dev), t["scale"].to(dev))
