"""A stage's models at its start: the student (fresh, warm-started, or from ``--init``) and the
teacher, with the activation grid and residual skip the run trains with."""
from __future__ import annotations

from pathlib import Path

import torch

from ..models import create_model, get_arch
from ..models._base import ACT_GRIDS, SRModel
from ..quant.modules import has_act_shifts, set_quant_mode
from .config import TrainConfig, check_source_scales
from .state import load_state

__all__ = ["resolve_variants", "prepare_models", "warm_start"]

#: model variants a training checkpoint records, with what a checkpoint that lacks one means
_VARIANTS = {"act_grid": "signed", "skip": "official"}

#: the mode each stage trains its student in
_STUDENT_MODE = {"fp": "fp32", "pams": "w8a8", "cadyq": "dynamic"}


def _variant(state: dict, key: str) -> str:
    """Variant ``key`` (``act_grid`` or ``skip``) of a training checkpoint (older ones: the default)."""
    return (state.get("config") or {}).get(key) or _VARIANTS[key]


def resolve_variants(cfg: TrainConfig, resume: dict | None, init: dict | None) -> None:
    """Set ``cfg.act_grid``, ``cfg.skip`` and ``cfg.act_shift``: the given ones, else the run's own (``resume``) or
    those of ``init`` (the --init checkpoint of a pams/cadyq start, as read; ``None`` for ``fp``).

    Refused in one line: an unknown value, a change on resume, and a grid other than the one
    the --init clips were learned for (an ``fp`` init has none; the skip may change at a start).
    """
    offered = {"act_grid": ACT_GRIDS, "skip": get_arch(cfg.arch).skips}
    for key, values in offered.items():
        if getattr(cfg, key) is not None and getattr(cfg, key) not in values:
            raise SystemExit(f"--{key.replace('_', '-')} must be one of {', '.join(values)} for {cfg.arch}, "
                             f"not {getattr(cfg, key)!r}")
    if resume is not None:
        for key in _VARIANTS:
            own = _variant(resume, key)
            if getattr(cfg, key) not in (None, own):
                raise SystemExit(f"{cfg.run_dir} was trained with --{key.replace('_', '-')} {own}, not {getattr(cfg, key)}")
            setattr(cfg, key, own)
        own_shift = bool((resume.get("config") or {}).get("act_shift"))
        if cfg.act_shift not in (None, own_shift):
            raise SystemExit(f"{cfg.run_dir} was trained {'with' if own_shift else 'without'} --act-shift")
        cfg.act_shift = own_shift
        return
    init = init or {}
    _resolve_shift(cfg, init)
    if init and (init.get("config") or {}).get("stage") != "fp":  # clips learned for a grid
        inherited = _variant(init, "act_grid")
        if cfg.act_grid not in (None, inherited):
            raise SystemExit(f"--act-grid {cfg.act_grid}: the clips of --init {cfg.init} were learned for {inherited}")
        cfg.act_grid = inherited
    cfg.act_grid = cfg.act_grid or _VARIANTS["act_grid"]
    if cfg.skip is None:
        cfg.skip = _variant(init, "skip")
        if cfg.skip not in offered["skip"]:
            raise SystemExit(f"--init {cfg.init} was trained with skip {cfg.skip}, which {cfg.arch} does not offer")


def _resolve_shift(cfg: TrainConfig, init: dict) -> None:
    """Set ``cfg.act_shift`` at a start: the given one, else whether the --init model has shifts. Refused in one
    line: on an fp stage (no quantizer to shift for), and without shifts after an --init that learned them."""
    inherited = has_act_shifts(init.get("model", {}))
    if cfg.stage == "fp":
        if cfg.act_shift:
            raise SystemExit("--act-shift is for the pams and cadyq stages (an fp stage quantizes nothing)")
        cfg.act_shift = False
        return
    if cfg.act_shift is False and inherited:
        raise SystemExit(f"--no-act-shift: the model of --init {cfg.init} learned input shifts; it keeps them")
    cfg.act_shift = bool(cfg.act_shift) or inherited


def warm_start(model: SRModel, path: str | Path, state: dict | None = None) -> list[str]:
    """Copy every tensor of checkpoint ``path`` (``state``: its contents, already read) whose name
    and shape match ``model``'s.

    Used to start a new scale from a trained one (EDSR's scale-independent head and body);
    returns the names left at their fresh initialization (the upsampler, typically).
    """
    src = (state if state is not None else load_state(path))["model"]
    own = model.state_dict()
    take = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise SystemExit(f"{path}: no tensor matches {type(model).__name__}")
    model.load_state_dict(take, strict=False)
    return sorted(set(own) - set(take))


def _model_from_state(state: dict, cfg: TrainConfig, source: str) -> SRModel:
    """The model of a training checkpoint (``source``: how to name it in an error), with the activation grid
    and skip it was trained with; refused where it lacks a scale the stage trains."""
    check_source_scales(state.get("config") or {}, cfg, source)
    model: SRModel = create_model(cfg.arch, cfg.scale)  # type: ignore[assignment]
    model.load_state_dict(state["model"], strict=True)
    model.set_act_grid(_variant(state, "act_grid"))
    model.set_skip(_variant(state, "skip"))
    return model


def _teacher(cfg: TrainConfig, init: dict | None) -> SRModel | None:
    """The frozen teacher of a pams/cadyq stage: ``--teacher``, else ``--init`` (``init``: its
    contents where already read). It runs fp32, except a quantized (PAMS) teacher of a cadyq stage: w8a8."""
    src = cfg.teacher or cfg.init
    if not src:
        return None
    state = init if init is not None and src == cfg.init else load_state(src)
    teacher = _model_from_state(state, cfg, f"--teacher {src}")
    fp_teacher = (state.get("config") or {}).get("stage") == "fp"  # its clips were never calibrated
    set_quant_mode(teacher, "fp32" if cfg.stage == "pams" or fp_teacher else "w8a8")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def prepare_models(cfg: TrainConfig, resume: dict | None, init: dict | None) -> tuple[SRModel, SRModel | None]:
    """Build the student (and teacher) of a stage, in the mode the stage trains.

    ``resume``: the run's own checkpoint (its weights are loaded later, with the optimizer);
    ``init``: the --init checkpoint of a fresh pams/cadyq start, as read (``None`` otherwise).
    """
    if cfg.stage == "fp":
        model: SRModel = create_model(cfg.arch, cfg.scale)  # type: ignore[assignment]
        if resume is None and cfg.init:
            warm_start(model, cfg.init)
        set_quant_mode(model, "fp32")
        return model, None
    if resume is None:
        assert init is not None  # train_stage has checked that a fresh pams/cadyq run has --init
        model = _model_from_state(init, cfg, f"--init {cfg.init}")
    else:
        model = create_model(cfg.arch, cfg.scale)  # type: ignore[assignment]
    model.set_act_grid(cfg.act_grid or "signed")
    model.set_skip(cfg.skip or "official")
    if cfg.act_shift:
        model.enable_act_shift()
    if cfg.stage == "cadyq" and resume is None:
        with torch.no_grad():  # the official renaming: the 8-bit clip seeds all three candidates
            for sel in model.selectors:
                a = sel.quant_bit3.alpha.clone()
                for q in sel.candidates:
                    q.alpha.copy_(a)
    teacher = _teacher(cfg, init)
    set_quant_mode(model, _STUDENT_MODE[cfg.stage])
    return model, teacher
