"""Shipped checkpoints (``weights/manifest.json``) and the one model loader behind every command."""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CadyqError, CheckpointReadError, UnknownModelError

if TYPE_CHECKING:  # the manifest helpers (``cadyq models``) must not import torch
    from .models._base import SRModel

__all__ = ["WeightsCfg", "weights_dir", "list_weights", "list_backbones", "list_wip", "resolve_weights", "shipped_path", "file_sha256", "load_model", "DEFAULT_MODEL"]

DEFAULT_MODEL = "edsr-baseline"


@dataclass(frozen=True)
class WeightsCfg:
    """One shipped checkpoint, as recorded in the manifest."""

    name: str
    file: str
    arch: str
    scale: int
    sha256: str
    params: int = 0
    data: str = ""
    license: str = ""
    stages: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    notes: str = ""
    act_grid: str = "signed"  # activation grid of the clips (see SRModel.set_act_grid)
    skip: str = "official"  # residual-skip semantics (see SRModel.set_skip)
    recipe: str = ""  # the recipe that trains it (recipes/<recipe>.toml)
    backbone: str = ""  # the shipped full-precision backbone its lineage starts from (see list_backbones)
    scales: list = field(default_factory=list)  # a multi-scale file: the scales it serves, one entry each
    storage: str = "float32"  # how the file stores its convolution kernels (see checkpoint.stored_state_dict)

    @property
    def path(self) -> Path:
        """Absolute path of the weights file."""
        return weights_dir() / self.file


def weights_dir() -> Path:
    """Folder of shipped weights: $CADYQ_WEIGHTS_DIR, the installed copy, or the source tree's."""
    env = os.environ.get("CADYQ_WEIGHTS_DIR")
    if env:
        return Path(env)
    try:
        import cadyq_weights  # installed by `pip install .` from weights/

        return Path(cadyq_weights.__file__).parent
    except ImportError:
        return Path(__file__).resolve().parent.parent / "weights"


def _manifest(section: str) -> list[dict]:
    """One list of the weights manifest (``models``, ``backbones`` or ``wip``; empty when there is none)."""
    manifest = weights_dir() / "manifest.json"
    if not manifest.is_file():
        return []
    return json.loads(manifest.read_text()).get(section, [])


def list_weights() -> list[WeightsCfg]:
    """Shipped models: the ``models`` entries of the weights manifest."""
    known = set(WeightsCfg.__dataclass_fields__)
    return [WeightsCfg(**{k: v for k, v in m.items() if k in known}) for m in _manifest("models")]


def list_backbones() -> dict[str, dict]:
    """Shipped full-precision backbones (``weights/backbones/``, manifest ``backbones``) by name;
    each entry's ``path`` is its file. A training lineage starts from one with ``--init``."""
    return {b["name"]: {**b, "path": weights_dir() / b["file"]} for b in _manifest("backbones")}


def list_wip() -> dict[str, dict]:
    """Training runs in progress kept across sessions (``weights/wip/``, manifest ``wip``) by run name: each
    entry names its file (``path``), the step it reached of how many, its start and the rule it runs under.
    Not models: nothing loads them by name, and ``pip install .`` does not package their files (only the source
    tree has them)."""
    return {w["name"]: {**w, "path": weights_dir() / w["file"]} for w in _manifest("wip")}


def resolve_weights(name: str, scale: int | None = None) -> WeightsCfg:
    """Find a shipped checkpoint by full name (``edsr-baseline-x4``) or by family and scale."""
    entries = list_weights()
    by_name = {e.name: e for e in entries}
    if name in by_name:
        e = by_name[name]
        if scale is not None and e.scale != scale:
            raise UnknownModelError(f"model {name!r} is x{e.scale}, not x{scale}")
        return e
    if scale is not None and f"{name}-x{scale}" in by_name:
        return by_name[f"{name}-x{scale}"]
    names = sorted(by_name)
    close = difflib.get_close_matches(name if scale is None else f"{name}-x{scale}", names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else (f"; shipped: {', '.join(names)}" if names else "; no weights are shipped in this install")
    what = name if scale is None else f"{name} at x{scale}"
    raise UnknownModelError(f"no shipped model {what}{hint} (see `cadyq models`)")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_path(cfg: WeightsCfg, sha256: str | None = None) -> Path:
    """Path of a shipped weights file, checked against the manifest's sha256.

    Args:
        cfg: the manifest entry.
        sha256: the file's digest when the caller has read the file already (it is not read again).

    Raises:
        CheckpointReadError: the file is missing or does not match the manifest.
    """
    if not cfg.path.is_file():
        raise CheckpointReadError(f"shipped weights {cfg.file} are missing from {weights_dir()}")
    if cfg.sha256 and (sha256 or file_sha256(cfg.path)) != cfg.sha256:
        raise CheckpointReadError(f"{cfg.path}: checksum does not match the manifest; reinstall cadyq")
    return cfg.path


def load_model(
    model: str | None = None,
    weights: str | Path | None = None,
    arch: str | None = None,
    scale: int | None = 4,
    mode: str = "dynamic",
    device: str = "cpu",
    kernels: str = "auto",
    fp_layers: str = "fp32",
) -> SRModel:
    """Load a shipped model by name, or any checkpoint file (ours or official), ready to run.

    Args:
        model: shipped model name or family (``edsr-baseline``); default when no weights given.
        weights: path of a checkpoint file instead of a shipped model.
        arch: architecture of ``weights`` (detected from the keys when omitted).
        scale: upscaling factor.
        mode: ``dynamic``, ``fp32``, ``w8a8``, ``w8a6`` or ``w8a4``.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`cadyq_cli.devices.parse_device`).
        kernels: quantized convs on integer codes (``int8``), as fake-quantized float convs
            (``float``, the reference semantics op for op), or ``auto`` (int8 where the CPU
            supports exact int8 kernels); see :mod:`cadyq_cli.quant.intconv`.
        fp_layers: precision of the full-precision upsampling tail, ``fp32`` (default) or
            ``bf16`` (faster on CPUs with native bf16; see :meth:`SRModel.set_fp_layers`).

    Example:
        >>> m = load_model("edsr-baseline", scale=4, mode="dynamic")
    """
    from .checkpoint import load_model_file
    from .devices import parse_device
    from .quant.intconv import set_kernels
    from .quant.modules import set_quant_mode

    device = parse_device(device)
    if weights is not None:
        net = load_model_file(weights, arch, scale)
    else:
        cfg = resolve_weights(model or DEFAULT_MODEL, scale)
        net = load_model_file(shipped_path(cfg), cfg.arch, cfg.scale)
    set_quant_mode(net, mode)
    try:
        net.set_fp_layers(fp_layers)
    except ValueError as e:
        raise CadyqError(str(e)) from None
    if device != "cpu":
        net = net.to(device)
    net.eval()
    if device == "cpu":
        set_kernels(net, kernels)
    elif kernels == "int8":
        raise UnknownModelError("--kernels int8 runs on the CPU only")
    return net
