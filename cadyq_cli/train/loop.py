"""Resumable training stages: ``fp`` → ``pams`` (w8a8, learned clips) → ``cadyq`` (bit selectors).

Every stage writes ``<run>/last.pt`` (model, optimizer, step, RNG, config) at intervals and
when its time budget (``minutes``) runs out, and appends one JSON line per log interval and per
validation to ``<run>/log.jsonl``. Starting a stage again with the same run folder resumes it exactly.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import TilingConfig, upscale_array
from ..metrics import psnr_y
from ..models import create_model, get_arch
from ..models._base import ACT_GRIDS, SRModel
from ..quant.modes import CANDIDATE_BITS, set_quant_mode
from ..quant.modules import ActQuantizer, BitSelector
from ..quant.primitives import fake_quant_act, qmax_for_bits
from .data import SRPairs, data_fingerprint, list_images, split_pairs

__all__ = ["TrainConfig", "TrainingStopped", "train_stage", "save_state", "load_state", "warm_start", "bf16_helps",
           "oversubscribed"]

STAGES = ("fp", "pams", "cadyq")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in each checkpoint)."""

    stage: str = "fp"
    arch: str = "edsr_baseline"
    scale: int = 4
    data: list[str] = field(default_factory=list)
    run_dir: str = "runs/edsr_x4_fp"
    init: str | None = None  # checkpoint to start from (previous stage), ignored when resuming;
    # for ``fp`` a warm start: every tensor whose name and shape match is copied (e.g. the body
    # of another scale's model), the rest keeps its fresh initialization
    teacher: str | None = None  # cadyq/pams: teacher checkpoint (default: init)
    steps: int = 300_000  # schedule length (cosine); a session runs as many as its budget allows
    batch: int = 16
    lr_patch: int = 48
    lr: float = 2e-4
    lr_min: float = 1e-6
    selector_lr: float = 1e-3
    bit_weight_max: float = 0.5  # cadyq: weight of the bit loss reached at bit_ramp_steps
    bit_ramp_steps: int = 100
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
    log_every: int = 20
    calib_batches: int = 4
    data_id: str | None = None  # set by train_stage: fingerprint of the training image list (names, sizes)


def _own_running_threads() -> int:
    """Threads of this process in the running state (its torch worker threads count too)."""
    n = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            n += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            pass
    return max(n, 1)


def _busy_cpus() -> float | None:
    """Threads running on the machine now, besides this process's: the median of a few reads of
    ``procs_running`` in /proc/stat (the 1-minute load average, the fallback, still counts a
    pipeline's previous stage); ``None`` when neither can be read."""
    try:
        seen = []
        for i in range(7):
            with open("/proc/stat") as f:
                total = [int(ln.split()[1]) for ln in f if ln.startswith("procs_running")]
            if total:
                seen.append(total[0] - _own_running_threads())
            if i < 6:
                time.sleep(0.02)
        if seen:
            return max(0.0, float(sorted(seen)[len(seen) // 2]))
    except (OSError, ValueError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def oversubscribed(threads: int = 0) -> str | None:
    """A one-line warning when this run's torch threads exceed the cores other work leaves free.

    OpenMP threads that have to share a core wait on each other: here a 2-thread pams run beside a
    1-thread run on 2 cores made 11 steps in 6 minutes, against ~55 with 1 thread.
    ``None`` when the threads fit, for one thread (fewer cannot help), or when the load is unknown.
    """
    busy = _busy_cpus()
    if busy is None:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    host = max(cores, os.cpu_count() or cores)  # a container's busy count is the host's
    free = max(1, min(cores, host - math.floor(busy + 0.5)))
    want = threads or torch.get_num_threads()
    if want <= free:
        return None
    return (f"warning: {want} torch thread(s) on {cores} core(s) with {busy:.0f} other thread(s) running: threads "
            f"sharing a core can slow training several-fold (--threads {free} may be faster)")


def bf16_helps(threads: int = 0) -> bool:
    """Whether bf16 autocast speeds up training on this CPU, measured: one 64->64 3x3 conv
    forward + backward on a batch of training-sized maps, fp32 against bf16 (about a second).

    On CPUs with native bf16 (AVX-512 BF16, AMX) autocast was ~2.8x faster here; on an AVX2-only
    CPU it was 15x slower (emulated), so a fixed default would be wrong on one of them.
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        conv = torch.nn.Conv2d(64, 64, 3, padding=1)
        x = torch.randn(8, 64, 48, 48, requires_grad=True)

        def run(bf16: bool) -> float:
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = conv(x)
                y.float().sum().backward()
                best = min(best, time.perf_counter() - t)
            return best

        return run(True) < 0.8 * run(False)
    finally:
        torch.set_num_threads(old)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": None, "python": random.getstate()}


def save_state(path: Path, model: SRModel, opt: torch.optim.Optimizer | None, step: int, cfg: TrainConfig,
               np_rng: np.random.Generator, elapsed_s: float) -> None:
    """Write a resumable checkpoint atomically."""
    sd, sel_train = _folded_state(model)
    dev = next(model.parameters()).device
    state = {
        "format": "cadyq-train-1",
        "config": asdict(cfg),
        "step": step,
        "elapsed_s": elapsed_s,
        "model": _to_cpu(sd),
        "selector_train": _to_cpu(sel_train),
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


def _to_cpu(obj: object) -> object:
    """``obj`` with every tensor inside (dicts, lists) on the CPU: checkpoints load anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


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


def load_state(path: Path) -> dict:
    """Load a training checkpoint written by :func:`save_state` (no code execution)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    t = min(step / max(cfg.steps, 1), 1.0)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * t))


def _load_model_weights(path: str, cfg: TrainConfig) -> SRModel:
    """The model of a training checkpoint, with the activation grid and skip it was trained with."""
    st = load_state(Path(path))
    model = create_model(cfg.arch, cfg.scale)
    sd = st["model"] if "model" in st else st
    model.load_state_dict(sd, strict=True)
    model.set_act_grid(_variant(st, "act_grid"))
    model.set_skip(_variant(st, "skip"))
    return model  # type: ignore[return-value]


#: model variants a training checkpoint records, with what a checkpoint that lacks one means
_VARIANTS = {"act_grid": "signed", "skip": "official"}


def _variant(state: dict, key: str) -> str:
    """Variant ``key`` (``act_grid`` or ``skip``) of a training checkpoint (older ones: the default)."""
    return (state.get("config") or {}).get(key) or _VARIANTS[key]


def _resolve_variants(cfg: TrainConfig, resume: dict | None) -> None:
    """Set ``cfg.act_grid`` and ``cfg.skip``: the given ones, else the run's own (resume) or the
    --init checkpoint's (read once).

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
        return
    init = load_state(Path(cfg.init)) if cfg.init and cfg.stage != "fp" else {}
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


def warm_start(model: SRModel, path: str) -> list[str]:
    """Copy every tensor of checkpoint ``path`` whose name and shape match ``model``'s.

    Used to start a new scale from a trained one (EDSR's scale-independent head and body);
    returns the names left at their fresh initialization (the upsampler, typically).
    """
    st = load_state(Path(path))
    src = st["model"] if "model" in st else st
    own = model.state_dict()
    take = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise SystemExit(f"{path}: no tensor matches {type(model).__name__}")
    model.load_state_dict(take, strict=False)
    return sorted(set(own) - set(take))


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


def _val_run(model: SRModel, val: SRPairs, bf16: bool, tiled: bool) -> tuple[float, list[float]]:
    """Mean PSNR over the held-out images and each image's FAB (empty when unquantized).

    ``tiled``: run the images as ``cadyq eval --tiling paper`` does (96 px LR patches, bits per
    patch), so that validation numbers predict benchmark ones; otherwise one whole-image forward.
    """
    psnrs, fabs = [], []
    dev = next(model.parameters()).device
    for lr, hr in zip(val.lr, val.hr):
        if tiled:
            sr, report = upscale_array(model, lr.astype(np.float32), TilingConfig(tiling="paper"))
            out = np.round(sr)
            fab = float(report.fab) if model.mode.quantized else None
        else:
            x = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].float().to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                y, bits = model(x)
            out = y.float().clamp(0, 255).round()[0].permute(1, 2, 0).cpu().numpy()
            fab = float(bits.mean()) if bits.numel() else None
        psnrs.append(psnr_y(out, hr, val.scale))
        if fab is not None:
            fabs.append(fab)
    return float(np.mean(psnrs)), fabs


@torch.no_grad()
def validate(model: SRModel, val: SRPairs, bf16: bool) -> dict[str, float]:
    """Mean PSNR (Y, shave = scale) and FAB on the held-out images.

    fp32 and w8a8 models run each image whole. A model in ``dynamic`` mode runs as
    ``cadyq eval --tiling paper`` does (bits chosen per 96 px patch: what the benchmarks
    measure), and again in ``w8a8`` with the same weights: ``val_psnr_w8a8`` is the reference its
    quality loss is judged against, on images it was not trained on.
    """
    was_training = model.training
    model.eval()
    mode = model.mode
    tiled = mode.name == "dynamic"
    try:
        psnr, fabs = _val_run(model, val, bf16, tiled)
        rec = {"val_psnr": psnr, "val_fab": float(np.mean(fabs)) if fabs else 32.0}
        if tiled:
            set_quant_mode(model, "w8a8")
            rec["val_psnr_w8a8"] = _val_run(model, val, bf16, tiled)[0]
    finally:
        set_quant_mode(model, mode)
        model.train(was_training)
    return rec


def _prepare(cfg: TrainConfig, resume: dict | None) -> tuple[SRModel, SRModel | None]:
    """Build the student (and teacher) for a stage."""
    teacher = None
    if cfg.stage == "fp":
        model = create_model(cfg.arch, cfg.scale)
        if resume is None and cfg.init:
            warm_start(model, cfg.init)
        set_quant_mode(model, "fp32")
        return model, None  # type: ignore[return-value]
    src = cfg.teacher or cfg.init  # train_stage has checked that a fresh pams/cadyq run has --init
    if cfg.stage == "pams":
        model = _load_model_weights(cfg.init, cfg) if resume is None else create_model(cfg.arch, cfg.scale)
        model.set_act_grid(cfg.act_grid or "signed")
        model.set_skip(cfg.skip or "official")
        teacher = _load_model_weights(src, cfg) if src else None
        if teacher is not None:
            set_quant_mode(teacher, "fp32")
        set_quant_mode(model, "w8a8")
    else:  # cadyq
        model = _load_model_weights(cfg.init, cfg) if resume is None else create_model(cfg.arch, cfg.scale)
        model.set_act_grid(cfg.act_grid or "signed")
        model.set_skip(cfg.skip or "official")
        if resume is None:
            with torch.no_grad():  # the official renaming: the 8-bit clip seeds all three candidates
                for sel in model.selectors:
                    a = sel.quant_bit3.alpha.clone()
                    for q in sel.candidates:
                        q.alpha.copy_(a)
        teacher = _load_model_weights(src, cfg) if src else None
        if teacher is not None:  # the PAMS teacher runs w8a8; an fp-stage teacher (uncalibrated clips) runs fp32
            fp_teacher = load_state(Path(src)).get("config", {}).get("stage") == "fp"
            set_quant_mode(teacher, "fp32" if fp_teacher else "w8a8")
        set_quant_mode(model, "dynamic")
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return model, teacher  # type: ignore[return-value]


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
def _calibrate(model: SRModel, data: SRPairs, rng: np.random.Generator, cfg: TrainConfig) -> None:
    """PAMS init: every clip value from the mean per-sample max |activation| of FP batches."""
    quants = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    set_quant_mode(model, "fp32")
    sums = {id(q): 0.0 for q in quants}

    # In fp32 mode a BitSelector returns its input without calling its candidates, so their
    # ``calibrating`` flag would never fire: calibrate them from the selector's input instead.
    def _sel_hook(sel: BitSelector, inputs: tuple) -> None:
        for q in sel.candidates:
            q.calibrate_(inputs[0])

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
def _init_selectors(model: SRModel, data: SRPairs, rng: np.random.Generator, cfg: TrainConfig,
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
        flat = x.detach().float().flatten()
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


# Settings that only say how (or how long) this invocation runs, not what it trains.
# The training images are compared by their fingerprint (``data_id``), not by their folder paths.
_RUNTIME_KEYS = ("minutes", "stop_at", "threads", "run_dir", "data", "val_every", "keep_val", "save_every", "log_every",
                 "device")


def _config_changes(saved: dict, cfg: TrainConfig) -> dict:
    """Training settings that differ between a checkpoint's config and a resuming one: {key: [old, new]}."""
    now = asdict(cfg)
    return {k: [saved.get(k), v] for k, v in now.items() if k not in _RUNTIME_KEYS and saved.get(k, v) != v}


class TrainingStopped(Exception):
    """Raised by :func:`train_stage` after a signal stopped it and the checkpoint was saved."""

    def __init__(self, signum: int, ckpt: Path) -> None:
        super().__init__(f"stopped by signal {signum}; saved {ckpt}")
        self.signum = signum
        self.ckpt = ckpt


class _StopSignals:
    """SIGTERM / SIGINT end training after the current step (then it saves and validates as at
    the time budget, and :class:`TrainingStopped` tells the caller); a second signal interrupts
    at once. Only the main thread can install handlers; a signal that is ignored (SIGINT in a
    job a non-interactive shell started in the background) stays ignored: there, ``kill PID``
    (SIGTERM) is how scripts stop a run cleanly."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)  # type: ignore[arg-type]
        self._old.clear()


def train_stage(cfg: TrainConfig, log: Callable[[str], None] = lambda s: None) -> Path:
    """Run (or resume) one stage until ``cfg.steps`` or ``cfg.minutes``; return the checkpoint path."""
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown stage {cfg.stage!r}; choose from {', '.join(STAGES)}")
    for k in ("val_every", "steps", "batch"):
        if getattr(cfg, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be at least 1, not {getattr(cfg, k)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
    run = Path(cfg.run_dir)
    ckpt = run / "last.pt"
    resume = load_state(ckpt) if ckpt.exists() else None
    changes: dict = {}
    if resume is not None:
        saved = resume["config"]
        for k in ("stage", "arch", "scale", "seed", "batch", "lr_patch"):
            if saved[k] != getattr(cfg, k):
                raise SystemExit(f"{ckpt} was trained with {k}={saved[k]!r}, not {getattr(cfg, k)!r}")
        for k in ("init", "teacher"):  # resuming without --init must keep the teacher (and its losses)
            if getattr(cfg, k) is None and saved.get(k):
                setattr(cfg, k, saved[k])
    elif cfg.stage != "fp" and cfg.init is None:
        raise SystemExit(f"stage {cfg.stage} needs --init (the previous stage's checkpoint)")
    for what in ("init", "teacher") if resume is None else ("teacher",):
        f = getattr(cfg, what)
        if f is not None and not Path(f).is_file():
            raise SystemExit(f"--{what} {f} does not exist")
    _resolve_variants(cfg, resume)
    for d in cfg.data:
        if not Path(d).is_dir():
            raise SystemExit(f"training data folder {d} does not exist")
    paths = list_images([Path(d) for d in cfg.data])
    if not paths:
        raise SystemExit(f"no training images under {', '.join(cfg.data)}")
    cfg.data_id = data_fingerprint([Path(d) for d in cfg.data])
    if resume is not None:
        changes = _config_changes(resume["config"], cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)

    t0 = time.time()
    data, val = split_pairs(paths, cfg.n_val, cfg.seed, cfg.scale, cfg.lr_patch)
    assert data is not None
    if not data.hr:
        raise SystemExit(f"no training image is at least {cfg.lr_patch * cfg.scale} px on each side "
                         f"(--lr-patch {cfg.lr_patch} at x{cfg.scale}) under {', '.join(cfg.data)}")
    log(f"data: {len(data.hr)} train / {len(val.hr)} val images, loaded in {time.time() - t0:.0f}s")

    model, teacher = _prepare(cfg, resume)
    run.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    model.to(dev)
    if teacher is not None:
        teacher.to(dev)
    sel_params = [p for s in model.selectors for p in s.net_small.parameters()]
    sel_ids = {id(p) for p in sel_params}
    main_params = [p for p in model.parameters() if p.requires_grad and id(p) not in sel_ids]
    groups = [{"params": main_params, "lr": cfg.lr}]
    if cfg.stage == "cadyq":
        groups.append({"params": sel_params, "lr": cfg.selector_lr, "fixed_lr": True})
    opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)

    step, elapsed = 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"], strict=True)
        _restore_selector_train(model, resume.get("selector_train") or {})
        opt.load_state_dict(resume["optimizer"])
        step, elapsed = int(resume["step"]), float(resume["elapsed_s"])
        torch.set_rng_state(resume["torch_rng"])
        np_rng.bit_generator.state = resume["numpy_rng"]
        random.setstate((3, tuple(resume["python_rng"]), None))
        if dev.type == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], dev)
        log(f"resumed {ckpt} at step {step} ({elapsed / 60:.1f} min trained)")
    elif cfg.stage == "pams":
        _calibrate(model, data, np_rng, cfg)
    elif cfg.stage == "cadyq":
        _init_selectors(model, data, np_rng, cfg, log)
    model.train()
    if teacher is not None:
        teacher.eval()

    feats_s: list[torch.Tensor] = []
    feats_t: list[torch.Tensor] = []
    hooks = []
    if cfg.stage == "cadyq" and teacher is not None and cfg.at_weight > 0:
        feats_s, h1 = _block_outputs(model)
        feats_t, h2 = _block_outputs(teacher, only_training=False)
        hooks = h1 + h2

    # Quantized models are validated in fp32 like inference: under bf16 autocast the selector
    # logits (sums of ~1e3) lose their +-1 differences (argmax ties -> 4 bits) and the eval
    # quantizer runs its clip/round grid in bf16.
    val_bf16 = cfg.bf16 and cfg.stage == "fp"
    start = time.time()
    budget_s = cfg.minutes * 60
    logf = open(run / "log.jsonl", "a")
    if changes:  # the run's lineage: what changed at this step (flushed: it must survive a crash)
        logf.write(json.dumps({"step": step, "config_change": changes}) + "\n")
        logf.flush()
        log(f"config changed at step {step}: {changes}")
    acc: dict[str, torch.Tensor] = {}  # summed on the device, read when logged
    n_acc = 0
    stop = _StopSignals()
    try:
        while step < min(cfg.steps, cfg.stop_at or cfg.steps) and time.time() - start < budget_s and not stop.signum:
            lr_now = _lr_at(cfg, step)
            for g in opt.param_groups:
                if not g.get("fixed_lr"):
                    g["lr"] = lr_now
            x, y = data.sample(np_rng, cfg.batch, cfg.lr_patch)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            feats_s.clear()
            feats_t.clear()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                sr, bits = model(x)
                t_out = None
                if teacher is not None and (cfg.distill_weight > 0 or hooks):
                    with torch.no_grad():
                        t_out, _ = teacher(x)
            sr = sr.float()
            loss_l1 = F.l1_loss(sr, y)
            loss = loss_l1
            parts = {"l1": loss_l1.detach()}  # tensors: read (a device sync) only when logged
            if t_out is not None and cfg.distill_weight > 0:
                ld = F.l1_loss(sr, t_out.float())
                loss = loss + cfg.distill_weight * ld
                parts["distill"] = ld.detach()
            if cfg.stage == "cadyq":
                soft = torch.stack(model._last_soft_bits, dim=1)  # (N, n_sel)
                lb = soft.mean()
                wb = cfg.bit_weight_max * min(1.0, step / max(cfg.bit_ramp_steps, 1))
                loss = loss + wb * lb
                parts["soft_bits"] = lb.detach()
                parts["fab"] = bits.detach().float().mean()
                if hooks:
                    la = sum((_attention(a) - _attention(b)).pow(2).mean() for a, b in zip(feats_s, feats_t))
                    loss = loss + cfg.at_weight * la
                    parts["at"] = la.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.stage != "fp":
                with torch.no_grad():
                    for q in model.modules():
                        if isinstance(q, ActQuantizer):
                            q.alpha.clamp_(min=1e-3)
            step += 1
            for k, v in parts.items():
                acc[k] = acc[k] + v if k in acc else v
            n_acc += 1
            now = elapsed + time.time() - start
            val_now = step % cfg.val_every == 0
            if val_now or step % cfg.log_every == 0:  # a validation step always logs
                rec = {"step": step, "min": round(now / 60, 2), "lr": lr_now, **{k: float(v) / n_acc for k, v in acc.items()}}
                acc, n_acc = {}, 0
                if val_now:
                    rec.update(validate(model, val, val_bf16))
                    if cfg.keep_val:
                        save_state(run / f"step{step:05d}.pt", model, opt, step, cfg, np_rng, now)
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log(json.dumps(rec))
            if step % cfg.save_every == 0:
                save_state(ckpt, model, opt, step, cfg, np_rng, now)
    finally:
        stop.restore()
        for h in hooks:
            h.remove()
        now = elapsed + time.time() - start
        save_state(ckpt, model, opt, step, cfg, np_rng, now)
        logf.close()
    rec = {"step": step, "min": round(now / 60, 2), "final": True, **validate(model, val, val_bf16)}
    if cfg.keep_val:
        save_state(run / f"step{step:05d}.pt", model, opt, step, cfg, np_rng, now)
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    log(json.dumps(rec))
    if stop.signum:
        raise TrainingStopped(stop.signum, ckpt)
    return ckpt
