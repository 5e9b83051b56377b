"""Resumable training stages: ``fp`` → ``pams`` (w8a8, learned clips) → ``cadyq`` (bit selectors).

Every stage writes ``<run>/last.pt`` (model, optimizer, step, RNG, config) at intervals and
when its time budget (``minutes``) runs out, and appends one JSON line per log interval and per
validation to ``<run>/log.jsonl``. Starting a stage again with the same run folder resumes it exactly.
With ``ema`` the weights' moving average is validated and saved as the checkpoint's model
(train/ema.py); with ``wip`` the run is also kept as one small file, and continued from it where
the run folder is gone (train/wip.py).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..models._base import SRModel
from ..quant.modes import CANDIDATE_BITS
from ..quant.modules import ActQuantizer
from ..quant.primitives import qmax_for_bits
from .calibrate import calibrate, init_selectors
from .config import TrainConfig, check_config, check_resume, config_changes, lr_at, scale_aug_text, train_scales
from .data import SRPairs, data_fingerprint, list_images, split_pairs_at
from .ema import WeightEMA
from .losses import AttentionTaps, stage_loss
from .prepare import prepare_models, resolve_variants
from .signals import StopSignals, TrainingStopped
from .state import load_state, restore_state, restore_weights, save_state
from .validate import validate
from .wip import read_wip, save_wip

__all__ = ["train_stage"]


def _device(cfg: TrainConfig) -> torch.device:
    """The torch device ``cfg.device`` names, refused in one line where it is unknown or absent."""
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise SystemExit(f"unknown device {cfg.device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {cfg.device} requested but CUDA is not available")
    if dev.type == "cuda" and cfg.stage != "fp":
        # quantization grids and selector decisions must round as on the CPU: no TF32 convs/matmuls
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return dev


def _read_init(cfg: TrainConfig, resume: dict | None, ckpt: Path) -> dict | None:
    """Check the run's sources (resumed checkpoint or --wip file ``ckpt``, --init, --teacher) and read
    --init once: the checkpoint a fresh pams/cadyq stage starts from (``None`` otherwise)."""
    if resume is not None:
        check_resume(resume["config"], cfg, ckpt)
    elif cfg.stage != "fp" and cfg.init is None:
        raise SystemExit(f"stage {cfg.stage} needs --init (the previous stage's checkpoint)")
    for what in ("init", "teacher") if resume is None else ("teacher",):
        f = getattr(cfg, what)
        if f is not None and not Path(f).is_file():
            raise SystemExit(f"--{what} {f} does not exist")
    return load_state(cfg.init) if resume is None and cfg.init and cfg.stage != "fp" else None


def _training_images(cfg: TrainConfig) -> list[Path]:
    """The images under ``cfg.data`` (refused when a folder is missing or holds none); sets ``cfg.data_id``."""
    for d in cfg.data:
        if not Path(d).is_dir():
            raise SystemExit(f"training data folder {d} does not exist")
    paths = list_images([Path(d) for d in cfg.data])
    if not paths:
        raise SystemExit(f"no training images under {', '.join(cfg.data)}")
    cfg.data_id = data_fingerprint([Path(d) for d in cfg.data])
    return paths


def _optimizer(model: SRModel, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the trainable parameters; the cadyq selectors and the input shifts at their own fixed
    learning rates."""
    sel_params = [p for s in model.selectors for p in s.net_small.parameters()]
    shifts = [(i, s.act_shift) for i, s in enumerate(model.selectors) if s.act_shift is not None]
    own_ids = {id(p) for p in sel_params} | {id(t) for _, t in shifts}
    main_params = [p for p in model.parameters() if p.requires_grad and id(p) not in own_ids]
    groups = [{"params": main_params, "lr": cfg.lr}]
    if cfg.stage == "cadyq":
        groups.append({"params": sel_params, "lr": cfg.selector_lr, "fixed_lr": True})
    # one group per selector's shift: its rate follows that selector's 4-bit step (set_shift_lrs)
    groups += [{"params": [t], "lr": 0.0, "fixed_lr": True, "shift_of": i} for i, t in shifts]
    opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    set_shift_lrs(opt, model, cfg)
    return opt


def set_shift_lrs(opt: torch.optim.Optimizer, model: SRModel, cfg: TrainConfig) -> None:
    """Each input shift's learning rate: ``--shift-lr`` in units of its selector's 4-bit step (alpha_4 / qmax_4, as
    the clip is now), so a shift moves by the same fraction of its grid on a signed residual input (steps of ~16 on
    the 0..255 scale) as on a ReLU output on the unsigned grid (~4)."""
    groups = [g for g in opt.param_groups if "shift_of" in g]
    if not groups:
        return
    sels = model.selectors
    steps = torch.cat([sels[g["shift_of"]].quant_bit1.alpha.detach().reshape(1).float()
                       / qmax_for_bits(CANDIDATE_BITS[0], sels[g["shift_of"]].signed) for g in groups]).tolist()
    for g, step in zip(groups, steps):  # one transfer of all the steps, not one per selector
        g["lr"] = cfg.shift_lr * step


def _start_ema(cfg: TrainConfig, model: SRModel, resume: dict | None) -> WeightEMA | None:
    """The weight average (``None`` when off): the resumed one, else a copy of the weights as they are now."""
    if cfg.ema <= 0:
        return None
    ema = WeightEMA(model, cfg.ema)
    if resume is not None and resume.get("ema") is not None:
        ema.load_state_dict(resume["ema"])
    return ema


def _validate(model: SRModel, val: dict[int, SRPairs], bf16: bool, ema: WeightEMA | None) -> dict:
    """:func:`validate` (on the weight average when there is one, recorded as ``val_weights``) at each trained
    scale: with several (a multi-scale model), ``val_psnr_x<s>`` (and ``val_fab_x<s>``, ``val_psnr_w8a8_x<s>``)
    per scale and their means as ``val_psnr`` etc."""
    def run() -> dict:
        if len(val) == 1:
            return validate(model, next(iter(val.values())), bf16)
        own, per = model.scale, {}
        try:
            for s, pairs in val.items():
                model.scale = s
                per[s] = validate(model, pairs, bf16)
        finally:
            model.scale = own
        rec: dict = {k: float(np.mean([r[k] for r in per.values()])) for k in per[own]}
        rec.update({f"{k}_x{s}": v for s, r in per.items() for k, v in r.items()})
        return rec

    if ema is None:
        return run()
    with ema.applied(model):
        return {**run(), "val_weights": "ema"}


def _train_step(cfg: TrainConfig, step: int, model: SRModel, teacher: SRModel | None, opt: torch.optim.Optimizer,
                data: dict[int, SRPairs], np_rng: np.random.Generator, dev: torch.device,
                taps: AttentionTaps | None) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step on a fresh batch (of each trained scale in turn); returns its learning rate and the
    loss parts."""
    lr_now = lr_at(cfg, step)
    for g in opt.param_groups:
        if not g.get("fixed_lr"):
            g["lr"] = lr_now
    set_shift_lrs(opt, model, cfg)
    scales = list(data)
    s = scales[step % len(scales)]
    model.scale = s
    if teacher is not None:  # a multi-scale teacher answers at the batch's scale
        teacher.scale = s
    x, y = data[s].sample(np_rng, cfg.batch, cfg.lr_patch)
    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
    if taps is not None:
        taps.clear()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        sr, bits = model(x)
        t_out = None
        if teacher is not None and (cfg.distill_weight > 0 or taps is not None):
            with torch.no_grad():
                t_out, _ = teacher(x)
    loss, parts = stage_loss(cfg, step, model, sr.float(), y, t_out, bits, taps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if cfg.stage != "fp":
        with torch.no_grad():
            for q in model.modules():
                if isinstance(q, ActQuantizer):
                    q.alpha.clamp_(min=1e-3)
    return lr_now, parts


def _save(ckpt: Path, model: SRModel, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
          np_rng: np.random.Generator, elapsed_s: float, ema: WeightEMA | None) -> None:
    """Save the run's checkpoint, and the --wip file with it when one is named."""
    save_state(ckpt, model, opt, step, cfg, np_rng, elapsed_s, ema)
    if cfg.wip:
        save_wip(cfg.wip, model, ema, step, cfg, elapsed_s)


def train_stage(cfg: TrainConfig, log: Callable[[str], None] = lambda s: None) -> Path:
    """Run (or resume) one stage until ``cfg.steps`` or ``cfg.minutes``; return the checkpoint path."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = _device(cfg)
    run = Path(cfg.run_dir)
    ckpt = run / "last.pt"
    resume = load_state(ckpt) if ckpt.exists() else None
    if cfg.wip is not None and Path(cfg.wip).is_dir():
        raise SystemExit(f"--wip {cfg.wip} is a folder, not a file")
    from_wip = resume is None and cfg.wip is not None and Path(cfg.wip).is_file()
    if from_wip:  # the run folder is gone (another session): continue from the --wip file
        resume = read_wip(cfg.wip)
    init = _read_init(cfg, resume, Path(cfg.wip) if from_wip else ckpt)
    resolve_variants(cfg, resume, init)
    paths = _training_images(cfg)
    changes = config_changes(resume["config"], cfg) if resume is not None else {}
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)

    t0 = time.time()
    datas: dict[int, SRPairs] = {}
    vals: dict[int, SRPairs] = {}
    for s, (pairs, vals[s]) in split_pairs_at(paths, cfg.n_val, cfg.seed, train_scales(cfg), cfg.lr_patch,
                                              tuple(cfg.scale_aug)).items():
        assert pairs is not None
        if not pairs.hr:
            raise SystemExit(f"no training image is at least {cfg.lr_patch * s} px on each side "
                             f"(--lr-patch {cfg.lr_patch} at x{s}) under {', '.join(cfg.data)}")
        datas[s] = pairs
    data, val = datas[cfg.scale], vals[cfg.scale]
    aug = f" (with copies downscaled by {scale_aug_text(cfg.scale_aug)})" if cfg.scale_aug else ""
    log(f"data: {len(data.hr)} train{aug} / {len(val.hr)} val images{' per scale' if len(datas) > 1 else ''}, "
        f"loaded in {time.time() - t0:.0f}s")

    model, teacher = prepare_models(cfg, resume, init)
    del init  # the student and teacher hold copies
    run.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    model.to(dev)
    if teacher is not None:
        teacher.to(dev)
    opt = _optimizer(model, cfg)
    step, elapsed = 0, 0.0
    if from_wip:  # weights only: a fresh optimizer (as at --init), the RNGs reseeded for this step
        restore_weights(resume, model)
        step, elapsed = resume["step"], resume["elapsed_s"]
        torch.manual_seed(cfg.seed + step)
        random.seed(cfg.seed + step)
        np_rng = np.random.default_rng(cfg.seed + step)
        log(f"resumed from --wip {cfg.wip} at step {step} ({elapsed / 60:.1f} min trained; Adam restarts)")
    elif resume is not None:
        step, elapsed = restore_state(resume, model, opt, np_rng, dev)
        log(f"resumed {ckpt} at step {step} ({elapsed / 60:.1f} min trained)")
    elif cfg.stage == "pams":
        calibrate(model, data, np_rng, cfg)
    elif cfg.stage == "cadyq":
        init_selectors(model, data, np_rng, cfg, log)
    ema = _start_ema(cfg, model, resume)
    model.train()
    taps = AttentionTaps(model, teacher) if cfg.stage == "cadyq" and teacher is not None and cfg.at_weight > 0 else None

    # Quantized models are validated in fp32 like inference: under bf16 autocast the selector
    # logits (sums of ~1e3) lose their +-1 differences (argmax ties -> 4 bits) and the eval
    # quantizer runs its clip/round grid in bf16.
    val_bf16 = cfg.bf16 and cfg.stage == "fp"
    start = time.time()
    budget_s = cfg.minutes * 60
    logf = open(run / "log.jsonl", "a")
    if from_wip:
        logf.write(json.dumps({"step": step, "resumed_from_wip": str(cfg.wip)}) + "\n")
        logf.flush()
    if changes:  # the run's lineage: what changed at this step (flushed: it must survive a crash)
        logf.write(json.dumps({"step": step, "config_change": changes}) + "\n")
        logf.flush()
        log(f"config changed at step {step}: {changes}")
    acc: dict[str, torch.Tensor] = {}  # summed on the device, read when logged
    n_acc = 0
    stop = StopSignals()
    try:
        while step < min(cfg.steps, cfg.stop_at or cfg.steps) and time.time() - start < budget_s and not stop.signum:
            lr_now, parts = _train_step(cfg, step, model, teacher, opt, datas, np_rng, dev, taps)
            step += 1
            if ema is not None:
                ema.update(model, step)
            for k, v in parts.items():
                acc[k] = acc[k] + v if k in acc else v
            n_acc += 1
            now = elapsed + time.time() - start
            val_now = step % cfg.val_every == 0
            if val_now or step % cfg.log_every == 0:  # a validation step always logs
                rec = {"step": step, "min": round(now / 60, 2), "lr": lr_now, **{k: float(v) / n_acc for k, v in acc.items()}}
                acc, n_acc = {}, 0
                if val_now:
                    rec.update(_validate(model, vals, val_bf16, ema))
                    if cfg.keep_val:
                        save_state(run / f"step{step:05d}.pt", model, opt, step, cfg, np_rng, now, ema)
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log(json.dumps(rec))
            if step % cfg.save_every == 0:
                _save(ckpt, model, opt, step, cfg, np_rng, now, ema)
    finally:
        stop.restore()
        if taps is not None:
            taps.remove()
        model.scale = cfg.scale
        now = elapsed + time.time() - start
        _save(ckpt, model, opt, step, cfg, np_rng, now, ema)
        logf.close()
    rec = {"step": step, "min": round(now / 60, 2), "final": True, **_validate(model, vals, val_bf16, ema)}
    if cfg.keep_val:
        save_state(run / f"step{step:05d}.pt", model, opt, step, cfg, np_rng, now, ema)
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    log(json.dumps(rec))
    if stop.signum:
        raise TrainingStopped(stop.signum, ckpt)
    return ckpt
