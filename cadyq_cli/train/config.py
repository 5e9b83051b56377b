"""What defines a training run (:class:`TrainConfig`), the checks on it, and its learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

__all__ = ["STAGES", "TrainConfig", "check_config", "check_resume", "check_source_scales", "config_changes", "lr_at", "scale_aug_ok",
           "scale_aug_text", "train_scales", "trained_scales"]

STAGES = ("fp", "pams", "cadyq")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in each checkpoint)."""

    stage: str = "fp"
    arch: str = "edsr_baseline"
    scale: int = 4
    # a multi-scale model (CARN): the scales trained, one batch each in turn, each validated (``scale``, one
    # of them, is the model's own afterwards); empty: ``scale`` alone
    scales: list[int] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    run_dir: str = "runs/edsr_x4_fp"
    init: str | None = None  # checkpoint to start from (previous stage), ignored when resuming;
    # for ``fp`` a warm start: every tensor whose name and shape match is copied (e.g. the body
    # of another scale's model), the rest keeps its fresh initialization
    teacher: str | None = None  # cadyq/pams: teacher checkpoint (default: init)
    steps: int = 300_000  # schedule length (cosine); a session runs as many as its budget allows
    batch: int = 16
    lr_patch: int = 48
    # also train on every training image downscaled by these factors (each in (0, 1); MATLAB bicubic):
    # more distinct content from a small set (the scale augmentation of VDSR/DRRN); validation is unchanged
    scale_aug: list[float] = field(default_factory=list)
    lr: float = 2e-4
    lr_min: float = 1e-6
    # decay of the weights' exponential moving average (e.g. 0.999; 0: off): validation, the checkpoint's
    # model and so export use the average, training goes on with the raw weights (train/ema.py)
    ema: float = 0.0
    selector_lr: float = 1e-3
    bit_weight_max: float = 0.5  # cadyq: weight of the bit loss reached at bit_ramp_steps
    bit_ramp_steps: int = 100
    # cadyq: a FAB budget for the bit loss: it counts only the batch's expected bits above this (hinged),
    # so the selectors spend bits freely up to it; None: every bit counts (the paper's loss)
    bit_target: float | None = None
    at_weight: float = 100.0  # cadyq: attention-transfer weight
    distill_weight: float = 1.0  # pams/cadyq: L1 to the teacher output
    selector_norm: bool = True  # cadyq: train the selectors on standardized features (folded on save)
    clip_init: str = "mse"  # cadyq: 4/6-bit candidate clips: "mse" (calibrated) or "copy" (official: 8-bit clip)
    # pams/cadyq: activation grid ("signed", official, or "relu-unsigned": ReLU inputs on the unsigned
    # grid); None: the --init checkpoint's (a run resumes with its own; fp: "signed")
    act_grid: str | None = None
    # pams/cadyq: residual skip ("official", or "fp": EDSR's block skip adds the unquantized input);
    # None: the --init checkpoint's (a run resumes with its own); unlike the grid it may change at a stage start
    skip: str | None = None
    # pams/cadyq: each selector quantizes its input after a learned per-channel shift (QuantSR's
    # redistribution; BitSelector.enable_shift); None: the --init checkpoint's (a run resumes with its own;
    # shifts once learned are kept). ``shift_lr``: their Adam rate in units of each selector's 4-bit step
    act_shift: bool | None = None
    shift_lr: float = 0.05
    minutes: float = 60.0
    stop_at: int | None = None  # stop this invocation at this step (the schedule still spans `steps`)
    seed: int = 0
    bf16: bool = True
    threads: int = 0
    device: str = "cpu"  # torch device to train on ("cuda" on an accelerator machine); checkpoints stay portable
    n_val: int = 10
    val_every: int = 250
    keep_val: bool = False  # also keep <run>/step<N>.pt at every validation (for picking a step on val)
    save_every: int = 100
    wip: str | None = None  # also keep the run as this one small file at every save, and continue from it (train/wip.py)
    wip_lean: bool = False  # the --wip file at about a quarter of its size: float16, the weight average only
    log_every: int = 20
    calib_batches: int = 4
    data_id: str | None = None  # set by train_stage: fingerprint of the training image list (names, sizes)


def scale_aug_ok(factors: object) -> bool:
    """Whether ``factors`` is a valid ``scale_aug``: a list of distinct numbers in (0, 1)."""
    return (isinstance(factors, list) and len(set(factors)) == len(factors)
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0.0 < f < 1.0 for f in factors))


def scale_aug_text(factors: list[float]) -> str:
    """``--scale-aug``'s factors as the option takes them (``0.9,0.8``): for messages and the training log."""
    return ",".join(f"{f:g}" for f in factors)


def _flag(key: str) -> str:
    """A TrainConfig field as ``cadyq train`` spells its option (``bit_target`` → ``--bit-target``)."""
    return "--" + key.replace("_", "-")


def check_config(cfg: TrainConfig, spell: Callable[[str], str] = _flag) -> None:
    """Refuse, in one line (``SystemExit``), an unknown stage, a count below 1, a ``--shift-lr`` that is not
    positive, an EMA decay outside [0, 1), a ``--scale-aug`` factor outside (0, 1) or repeated, a ``--bit-target``
    outside [4, 8] or outside the cadyq stage, or ``--wip-lean`` without ``--wip``. ``spell`` names a field in
    the messages (the CLI's options by default; a recipe passes its own keys)."""
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown stage {cfg.stage!r}; choose from {', '.join(STAGES)}")
    for k in ("val_every", "steps", "batch"):
        if getattr(cfg, k) < 1:
            raise SystemExit(f"{spell(k)} must be at least 1, not {getattr(cfg, k)}")
    if not cfg.shift_lr > 0:
        raise SystemExit(f"{spell('shift_lr')} must be positive (a fraction of each selector's 4-bit step), not "
                         f"{cfg.shift_lr}")
    if not 0.0 <= cfg.ema < 1.0:
        raise SystemExit(f"{spell('ema')} must be a decay in [0, 1) (e.g. 0.999; 0: off), not {cfg.ema}")
    if not scale_aug_ok(cfg.scale_aug):
        raise SystemExit(f"{spell('scale_aug')} takes distinct downscaling factors in (0, 1) (e.g. 0.9,0.8,0.7,0.6), "
                         f"not {scale_aug_text(cfg.scale_aug)}")
    if cfg.bit_target is not None and not 4.0 <= cfg.bit_target <= 8.0:
        raise SystemExit(f"{spell('bit_target')} is a FAB budget between 4 and 8 bits, not {cfg.bit_target:g}")
    if cfg.bit_target is not None and cfg.stage != "cadyq":
        raise SystemExit(f"{spell('bit_target')} is a budget for the cadyq stage's bit loss; the fp and pams stages "
                         "have none")
    if cfg.wip_lean and not cfg.wip:
        raise SystemExit(f"{spell('wip_lean')} says how to keep the {spell('wip')} file: name one with {spell('wip')} FILE")
    if cfg.scales:
        from ..errors import CadyqError
        from ..models import get_arch

        try:
            cls = get_arch(cfg.arch)
        except CadyqError as e:
            raise SystemExit(str(e)) from None
        if not cls.multi_scale:
            raise SystemExit(f"{spell('scales')} is for multi-scale models (carn), not {cfg.arch}: train one "
                             f"{spell('scale')}")
        bad = [s for s in cfg.scales if s not in cls.supported_scales]
        if bad or len(set(cfg.scales)) != len(cfg.scales) or cfg.scale not in cfg.scales:
            raise SystemExit(f"{spell('scales')} takes distinct scales of {', '.join(map(str, cls.supported_scales))} "
                             f"including {spell('scale')} {cfg.scale}, not {','.join(map(str, cfg.scales))}")


def trained_scales(saved: dict) -> list[int] | None:
    """The scales a checkpoint (config ``saved``) was trained at; ``None`` where it records none (a shipped or
    official file)."""
    if "scales" not in saved:
        return None
    return list(saved["scales"]) or [saved.get("scale")]


def check_source_scales(saved: dict, cfg: TrainConfig, what: str) -> None:
    """Refuse, in one line, a multi-scale pams/cadyq stage whose ``--init``/``--teacher`` (config ``saved``)
    was trained at fewer scales: its other upsamplers never learned. Sources that record no training
    scales are taken as they are."""
    trained = trained_scales(saved)
    if not cfg.scales or trained is None:
        return
    if missing := [s for s in cfg.scales if s not in trained]:
        raise SystemExit(f"{what} was trained at x{', x'.join(map(str, trained))} only, not at "
                         f"x{', x'.join(map(str, missing))}: train it with --scales {','.join(map(str, cfg.scales))}")


def train_scales(cfg: TrainConfig) -> list[int]:
    """The scales a run trains: ``scales``, or ``scale`` alone."""
    return list(cfg.scales) or [cfg.scale]


#: settings a resumed run must share with its checkpoint (they fix what the saved state means)
_FIXED_KEYS = ("stage", "arch", "scale", "scales", "seed", "batch", "lr_patch")


def check_resume(saved: dict, cfg: TrainConfig, ckpt: object) -> None:
    """Before resuming checkpoint ``ckpt`` (whose config is ``saved``): refuse a change of a fixed
    setting, and keep its ``init`` and ``teacher`` where ``cfg`` names none (the teacher's losses go on)."""
    for k in _FIXED_KEYS:
        was = saved.get(k, _ABSENT.get(k))
        if was != getattr(cfg, k):
            raise SystemExit(f"{ckpt} was trained with {k}={was!r}, not {getattr(cfg, k)!r}")
    for k in ("init", "teacher"):
        if getattr(cfg, k) is None and saved.get(k):
            setattr(cfg, k, saved[k])


# Settings that only say how (or how long) this invocation runs, not what it trains.
# The training images are compared by their fingerprint (``data_id``), not by their folder paths.
_RUNTIME_KEYS = ("minutes", "stop_at", "threads", "run_dir", "data", "val_every", "keep_val", "save_every", "log_every",
                 "device", "wip", "wip_lean")
#: what a setting missing from an older checkpoint's config meant (others: compared only where recorded)
_ABSENT: dict[str, object] = {"ema": 0.0, "scales": [], "scale_aug": [], "bit_target": None}


def config_changes(saved: dict, cfg: TrainConfig) -> dict:
    """Training settings that differ between a checkpoint's config and a resuming one: {key: [old, new]}."""
    now = asdict(cfg)
    old = {**_ABSENT, **saved}
    return {k: [old.get(k), v] for k, v in now.items() if k not in _RUNTIME_KEYS and old.get(k, v) != v}


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of the main parameters at ``step``: cosine from ``lr`` to ``lr_min`` over ``steps``."""
    t = min(step / max(cfg.steps, 1), 1.0)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * t))
