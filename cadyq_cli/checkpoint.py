"""Reading and writing weights: our safetensors files and official CADyQ/PAMS checkpoints.

Loading never executes code from a file: safetensors, or ``torch.load(weights_only=True)``
with no fallback. Official files (bare state dict or ``{'state_dict': ...}``, ``.pt`` or
``.pth.tar``, CADyQ or PAMS) are converted to our module layout, whose key names are the
official CADyQ ones, and loaded strictly; any missing, unexpected or mis-shaped key is named.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointMismatchError, CheckpointReadError, UnsafeCheckpointError
from .models import create_model, get_arch
from .models._base import ACT_GRIDS, SRModel
from .models._pams import strip_module_prefix
from .quant.modules import has_act_shifts

__all__ = ["read_state_dict", "read_checkpoint", "safetensors_metadata", "fits", "weights_digest", "detect_arch", "load_model_file", "save_weights", "save_state_dict", "model_from_state_dict",
           "stored_state_dict", "weights_metadata", "STORAGE_DTYPES"]

FORMAT = "cadyq-weights-1"
#: format tag of our training checkpoints (written by ``cadyq_cli.train.state.save_state``)
TRAIN_FORMAT = "cadyq-train-1"
#: what both a training checkpoint's config and a weights file's metadata record about the model
MODEL_KEYS = ("stage", "arch", "scale", "act_grid", "skip")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "params_ema", "params"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointReadError(f"{path}: not a state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointReadError(f"{path}: not a state dict (entry {bad[0]!r} is not a tensor)")
    return strip_module_prefix(obj)  # type: ignore[arg-type]


def _is_safetensors(path: Path, head: bytes) -> bool:
    """Whether a weights file is safetensors: by its name, or by its first 16 bytes ``head`` (a header length, then JSON)."""
    return path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{")


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, from its header alone (no tensor is read); ``{}`` for any other
    file, or one that cannot be read (:func:`read_checkpoint` says why in one line)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with open(path, "rb") as f:
            if not _is_safetensors(path, f.read(16)):
                return {}
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def _load(path: Path) -> tuple[object, dict[str, str]]:
    """The object a weights file stores, loaded safely, with its safetensors metadata (else empty).

    Raises:
        CheckpointReadError: missing, empty, truncated or non-checkpoint file.
        UnsafeCheckpointError: a pickle that references code (it is not executed).
    """
    if not path.is_file():
        raise CheckpointReadError(f"{path}: no such weights file")
    if path.stat().st_size == 0:
        raise CheckpointReadError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(path, head):
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            sd = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointReadError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
        return sd, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        detail = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln or "global" in ln), msg.splitlines()[0])
        raise UnsafeCheckpointError(
            f"{path}: refused, the file would run code to load ({detail[:160]}); only plain tensor checkpoints are accepted"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointReadError(f"{path}: corrupt, truncated or not a PyTorch checkpoint ({first[:160]})") from None
    return obj, {}


def _is_training_state(obj: object) -> bool:
    """Whether ``obj`` is one of our training checkpoints (``TRAIN_FORMAT``: it records its config)."""
    return isinstance(obj, dict) and isinstance(obj.get("config"), dict)


def read_checkpoint(path: str | Path) -> dict:
    """Read any weights file safely as a training state (the one reader of our training checkpoints).

    Our training checkpoints (:data:`TRAIN_FORMAT`: ``config``, ``model``, ``step``, optimizer and RNG
    state) come back as saved. Any other file (a safetensors file, an official checkpoint) comes back as
    ``{"model": state dict, "config": {...}}``, the config holding the :data:`MODEL_KEYS` its metadata
    records (``None`` where it records none): weights only, no optimizer state.

    Raises:
        CheckpointReadError, UnsafeCheckpointError: as :func:`read_state_dict`.
    """
    path = Path(path)
    obj, meta = _load(path)
    if _is_training_state(obj):
        return obj  # type: ignore[return-value]
    config: dict[str, object] = {k: meta.get(k) for k in MODEL_KEYS}
    config["scale"] = int(meta["scale"]) if meta.get("scale", "").isdigit() else None
    return {"model": _unwrap(obj, path), "config": config}


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file safely.

    Returns:
        (state dict of CPU tensors, metadata: ``arch``/``scale`` when the file records them; a
        training checkpoint's are the :data:`MODEL_KEYS` its config records).

    Raises:
        CheckpointReadError: missing, empty, truncated or non-checkpoint file.
        UnsafeCheckpointError: a pickle that references code (it is not executed).
    """
    path = Path(path)
    obj, meta = _load(path)
    if _is_training_state(obj):
        config = obj["config"]  # type: ignore[index]
        meta = {k: str(config[k]) for k in MODEL_KEYS if config.get(k) is not None}
    return _unwrap(obj, path), meta


def detect_arch(sd: dict[str, torch.Tensor]) -> str | None:
    """Guess the architecture from characteristic keys (None if nothing fits)."""
    if "entry.weight" in sd and any(k.startswith("upsample.up") for k in sd):
        return "carn"
    if any(k.startswith("fblock.") for k in sd) and "deconv.weight" in sd:
        return "idn"
    if "body.0.conv1.weight" in sd and "head.1.weight" in sd:
        return "srresnet"
    if "body.0.body.0.weight" in sd and "head.0.weight" in sd:
        return "edsr_baseline"
    return None


def detect_scale(arch: str, sd: dict[str, torch.Tensor]) -> int | None:
    """Scale implied by the keys, where the architecture encodes it (EDSR, SRResNet)."""
    if arch == "edsr_baseline" and "tail.0.0.weight" in sd:
        if sd["tail.0.0.weight"].shape[0] == 9 * sd["tail.0.0.weight"].shape[1]:
            return 3
        return 4 if "tail.0.2.weight" in sd else 2
    if arch == "srresnet" and "tail.0.0.weight" in sd:
        return 4 if "tail.0.3.weight" in sd else 2
    return None


def model_from_state_dict(sd: dict[str, torch.Tensor], arch: str | None = None, scale: int | None = None,
                          source: str = "checkpoint", act_grid: str = "signed", skip: str = "official") -> SRModel:
    """Build a model and load ``sd`` strictly (official PAMS files are converted first).

    ``act_grid``: the activation grid the clips were learned for (official files: ``signed``);
    ``skip``: the residual-skip semantics the weights were trained with (official files: ``official``).
    """
    if act_grid not in ACT_GRIDS:
        raise CheckpointMismatchError(f"{source}: unknown activation grid {act_grid!r} (this cadyq knows {', '.join(ACT_GRIDS)})")
    found = detect_arch(sd)
    if arch is None:
        if found is None:
            raise CheckpointMismatchError(f"{source}: not a checkpoint of a known architecture (edsr, carn, srresnet, idn)")
        arch = found
    arch = get_arch(arch).arch
    if found is not None and found != arch:
        raise CheckpointMismatchError(f"{source}: this is a {found} checkpoint, not {arch}")
    implied = detect_scale(arch, sd)
    if scale is None:
        scale = implied
        if scale is None:
            raise CheckpointMismatchError(f"{source}: the {arch} checkpoint does not record its scale; pass --scale")
    elif implied is not None and implied != scale:
        raise CheckpointMismatchError(f"{source}: the {arch} checkpoint is for x{implied}, not x{scale}")
    module = __import__(get_arch(arch).__module__, fromlist=["pams_to_cadyq"])
    if getattr(module, "is_pams_state_dict", lambda s: False)(sd):
        sd = module.pams_to_cadyq(sd)
    model: SRModel = create_model(arch, scale)  # type: ignore[assignment]
    if has_act_shifts(sd):  # trained with --act-shift: its selectors shift their input
        model.enable_act_shift()
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[0]})")
        raise CheckpointMismatchError(f"{source}: does not fit {arch} x{scale}: " + "; ".join(parts))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
    model.set_act_grid(act_grid)
    if skip not in model.skips:
        raise CheckpointMismatchError(f"{source}: unknown skip {skip!r} for {arch} (this cadyq knows {', '.join(model.skips)})")
    model.set_skip(skip)
    return model.eval()


def load_model_file(path: str | Path, arch: str | None = None, scale: int | None = None) -> SRModel:
    """Load a weights file (ours or official) into a model in eval mode."""
    sd, meta = read_state_dict(path)
    if arch is None and "arch" in meta:
        arch = meta["arch"]
    if scale is None and meta.get("scale", "").isdigit():
        scale = int(meta["scale"])
    elif scale is not None and meta.get("scale", "").isdigit() and int(meta["scale"]) != scale and meta.get("arch") != "carn":
        raise CheckpointMismatchError(f"{path}: the weights are for x{meta['scale']}, not x{scale}")
    return model_from_state_dict(sd, arch, scale, source=str(path), act_grid=meta.get("act_grid", "signed"),
                                 skip=meta.get("skip", "official"))


def _canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes ``__metadata__`` in hash-map order, which changes from process to process;
    sorting makes a file a pure function of its tensors and metadata (reproducible sha256).
    Tensor offsets are relative to the data section, so only the header is rewritten.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


#: how a weights file may store its floating tensors (loading always computes in float32)
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def fits(v: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``v`` can be stored as ``dtype`` without a finite value becoming inf (a value near the top of the
    range rounds to the largest finite one, as the cast does). The one test both float16 stores use: shipped
    kernels (:func:`stored_state_dict`, which refuses) and lean ``--wip`` files (which keep such a tensor in float32)."""
    return torch.equal(torch.isfinite(v.to(dtype)), torch.isfinite(v))


def weights_digest(model: SRModel, sd: dict[str, torch.Tensor] | None = None) -> str:
    """sha256 of what ``model`` computes with: its architecture, activation grid and block skip, and the tensors of
    ``sd`` (default: its state dict) by name, shape and value, floating ones as float32. The same for a checkpoint
    and a file that stores its tensors exactly, different where the storage rounded one (float16) or a bit bias
    was folded. ``cadyq eval --json`` records it, so an export can check that its metrics measured what it ships."""
    sd = model.state_dict() if sd is None else sd
    h = hashlib.sha256(f"{model.arch};{model.act_grid};{model.skip};".encode())
    for k in sorted(sd):
        t = sd[k].detach().cpu()
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def stored_state_dict(model: SRModel, storage: str = "float32") -> dict[str, torch.Tensor]:
    """The model's state dict as a weights file stores it: convolution kernels (4-D, nearly all of the
    bytes) in ``storage`` (``float16`` halves the file; a value outside float16's range is refused rather than
    stored as inf), everything else (biases, clips, bit selectors: small, and selectors fold large
    normalization factors) as it is."""
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage {storage!r} (this cadyq knows {', '.join(STORAGE_DTYPES)})")
    dtype = STORAGE_DTYPES[storage]
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and v.ndim == 4 and v.dtype != dtype:
            if not fits(v, dtype):
                raise ValueError(f"{k}: values beyond {storage}'s range; store the model in float32")
            v = v.to(dtype)
        sd[k] = v
    return sd


def weights_metadata(model: SRModel) -> dict[str, object]:
    """The metadata a weights file of ``model`` carries: ``arch``, ``scale`` and a non-default ``act_grid``,
    ``skip``, ``act_shift``."""
    meta: dict[str, object] = {"arch": model.arch, "scale": str(model.scale)}
    if model.act_grid != "signed":
        meta["act_grid"] = model.act_grid
    if model.skip != "official":
        meta["skip"] = model.skip
    if model.act_shift:  # the tensors say it too (``*.act_shift``); the metadata tells a reader without loading them
        meta["act_shift"] = "channel"
    return meta


def save_weights(model: SRModel, path: str | Path, metadata: dict[str, object] | None = None,
                 storage: str = "float32", stored: dict[str, torch.Tensor] | None = None) -> None:
    """Save a model as safetensors with :func:`weights_metadata` (and ``metadata``), aliased keys stored as
    copies, convolution kernels in ``storage`` (see :func:`stored_state_dict`; ``stored``: those tensors where
    the caller has them already).

    The file is byte-reproducible: the same weights and metadata give the same sha256.
    """
    tensors = stored if stored is not None else stored_state_dict(model, storage)
    save_state_dict(tensors, path, {**weights_metadata(model), **(metadata or {})})


def save_state_dict(sd: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, object]) -> None:
    """Write ``sd`` (tensors unchanged, aliased ones as copies) as a byte-reproducible safetensors file
    with ``metadata`` (non-strings as JSON) and the ``format`` tag; written atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    meta = {"format": FORMAT}
    for k, v in metadata.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(_canonical_safetensors(save(tensors, metadata=meta)))
    os.replace(tmp, path)
