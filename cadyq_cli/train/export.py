"""Turn a training checkpoint into shipped weights: safetensors file + manifest entry.

Usage:
    python -m cadyq_cli.train.export runs/edsr_x4_cadyq/last.pt --name edsr-baseline-x4 \
        --run runs/edsr_x4_fp --run runs/edsr_x4_pams --run runs/edsr_x4_cadyq \
        [--eval eval_x4.json] [--data "T91 + BSD200 + BSDS500test (../shared/data/train), 10 held out"] \
        [--fold-bit-bias 0.3] [--bit-floor body.0.bitsel1,body.1.bitsel1]
    python -m cadyq_cli.train.export runs/carn_cadyq/last.pt --name carn --scales 2,3,4 --storage float16 --eval x2.json ...
    python -m cadyq_cli.train.export runs/edsr_x4_fp7/last.pt --name edsr-baseline-x4-fp3 --backbone

The manifest (``weights/manifest.json``) records per model: arch, scale, parameters, the
stages with steps and minutes (read from each run's last checkpoint), data, seed, sha256 and
the measured benchmark metrics (from ``cadyq eval --json`` output).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..checkpoint import (STORAGE_DTYPES, load_model_file, save_state_dict, save_weights, stored_state_dict,
                          weights_digest)
from ..models._base import SRModel
from ..models._registry import get_arch
from ..weights import file_sha256
from .config import trained_scales
from .state import load_state

__all__ = ["check_measured", "export", "export_backbone", "model_entry_name", "stored_tensors", "write_weights"]


def _stage_info(run: Path) -> dict:
    st = load_state(run / "last.pt")
    cfg = st["config"]
    info = {"stage": cfg["stage"], "steps": int(st["step"]), "minutes": round(float(st["elapsed_s"]) / 60, 1),
            "batch": cfg["batch"], "lr_patch": cfg["lr_patch"], "lr": cfg["lr"], "seed": cfg["seed"], "bf16": cfg["bf16"]}
    if cfg.get("init"):
        info["init"] = cfg["init"]  # previous stage, or (fp) the warm-start checkpoint
    if cfg.get("ema"):
        info["ema"] = cfg["ema"]  # the checkpoint's model (what is exported) is the weights' moving average
    if cfg.get("scale_aug"):
        info["scale_aug"] = cfg["scale_aug"]  # it also trained on the images' downscaled copies
    if cfg["stage"] == "cadyq":
        info |= {k: cfg[k] for k in ("bit_weight_max", "bit_ramp_steps", "bit_target", "selector_lr", "selector_norm",
                                     "clip_init") if cfg.get(k) is not None}
    log = run / "log.jsonl"
    if log.is_file():
        vals = [json.loads(ln) for ln in log.read_text().splitlines() if "val_psnr" in ln]
        if vals:
            info["final_val_psnr"] = round(vals[-1]["val_psnr"], 3)
            for k in ("val_fab", "val_psnr_w8a8"):
                if k in vals[-1]:
                    info[f"final_{k}"] = round(vals[-1][k], 3)
        changes = [json.loads(ln) for ln in log.read_text().splitlines() if "config_change" in ln]
        if changes:  # settings changed on a resume: {"step": s, "config_change": {key: [old, new]}}
            info["changes"] = changes
    return info


def _metrics_from_eval(path: Path, scale: int | None = None) -> dict:
    """The metrics of ``cadyq eval --json`` output ``path``: {dataset: {mode: metrics}} (nothing where the
    evaluation ran at another ``scale``)."""
    data = json.loads(path.read_text())
    out: dict = {}
    if scale is not None and data.get("scale") != scale:
        return out
    for r in data["results"]:
        entry = {k: (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k)) for k in ("psnr", "ssim", "fab", "bitops_g")}
        entry["images"] = len(r.get("images", []))
        if r["mode"] not in ("bicubic", "fp32") and "kernels" in data:
            entry["kernels"] = data["kernels"]  # how the quantized convs ran
        out.setdefault(r["dataset"], {})[r["mode"]] = entry
    return out


def model_entry_name(name: str, scale: int, multi_scale: bool) -> str:
    """The manifest name of an exported model: ``name``, or ``<name>-x<scale>`` for each scale one multi-scale
    file serves."""
    return f"{name}-x{scale}" if multi_scale else name


def stored_tensors(model: SRModel, ckpt: Path, storage: str) -> dict:
    """The tensors a shipped file of ``model`` (read from ``ckpt``) stores as ``storage``; a kernel outside the
    storage's range is refused in one line."""
    try:
        return stored_state_dict(model, storage)
    except ValueError as e:
        raise SystemExit(f"{ckpt}: {e}") from None


def write_weights(model: SRModel, ckpt: Path, out: Path, storage: str, metadata: dict | None = None,
                  stored: dict | None = None) -> None:
    """Write ``model`` (read from ``ckpt``) to ``out`` as a shipped file stores it (``storage``): what the
    export writes and what a recipe evaluates. ``stored``: those tensors where the caller already has them
    (:func:`stored_tensors`)."""
    save_weights(model, out, metadata, storage, stored if stored is not None else stored_tensors(model, ckpt, storage))


def check_measured(model: SRModel, stored: dict, ckpt: Path, storage: str, eval_json: list[Path],
                   folded: float = 0.0, floored: bool = False) -> None:
    """Refuse (one line) an ``eval_json`` that measured other weights than ``model`` (with the bit bias ``folded``
    and any bit floors, ``floored``, already folded into it) stored as ``storage`` (``stored``: those tensors,
    :func:`stored_tensors`): its recorded ``weights_digest`` must be that of the tensors the export writes. A file
    without one (an older cadyq's) passes for float32 storage without a fold, whose tensors are the checkpoint's,
    and is refused otherwise; a file of bicubic rows alone measured no model and passes."""
    want = weights_digest(model, stored)
    for e in eval_json:
        try:
            data = json.loads(e.read_text())
            got, measured = data.get("weights_digest"), any(r["mode"] != "bicubic" for r in data["results"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise SystemExit(f"{e}: not a `cadyq eval --json` file ({type(err).__name__})") from None
        if not measured:
            continue
        if got is None and (storage != "float32" or folded or floored):
            raise SystemExit(f"{e}: records no weights digest; with {storage} storage or a folded bit bias or floor "
                             f"the metrics must come from `cadyq eval --json` of the exported file")
        if got is not None and got != want:
            raise SystemExit(f"{e}: measured other weights than {ckpt} stored as {storage}"
                             f"{f' with bit bias {folded:g} folded' if folded else ''}"
                             f"{' with bit floors folded' if floored else ''} (digest {got[:12]}…, not "
                             f"{want[:12]}…); evaluate the exported file")


def export(ckpt: Path, name: str, weights_dir: Path, runs: list[Path], eval_json: list[Path], data: str, notes: str,
           recipe: str = "", backbone: str = "", fold_bit_bias: float = 0.0, scales: list[int] | None = None,
           storage: str = "float32", bit_floor: list[str] | None = None) -> dict:
    """Write ``<weights_dir>/<name>.safetensors`` and update the manifest; return the entry.

    ``recipe`` / ``backbone``: the recipe that trains the model and the backbone it starts from
    (default: those of the entry it replaces; its metrics are kept only where the file is the same, sha256 for
    sha256: more evaluations of the same weights). ``fold_bit_bias``: an operating point chosen for the model
    (:meth:`~cadyq_cli.models._base.SRModel.fold_bit_bias`), recorded in the file's metadata and the entry.
    ``scales``: a multi-scale model (CARN) ships as one file with an entry ``<name>-x<s>`` per scale, each
    with the metrics of the evaluations at its scale; the entry at the model's own scale is returned.
    ``storage``: ``float16`` stores the weights at half the size (the entry says so; its metrics must then come
    from evaluating the stored file, as the recipe runner does: :func:`check_measured` refuses any other).
    ``bit_floor``: selectors floored at 8 bits (:meth:`~cadyq_cli.models._base.SRModel.fold_bit_floor`, layers
    chosen on non-benchmark data), recorded like ``fold_bit_bias``."""
    model = load_model_file(ckpt)
    if scales:
        trained = trained_scales(load_state(ckpt).get("config") or {}) if Path(ckpt).suffix == ".pt" else None
        if (not model.multi_scale or model.scale not in scales or len(set(scales)) != len(scales)
                or any(s not in model.supported_scales or s not in (trained or scales) for s in scales)):
            raise SystemExit(f"{ckpt}: --scales {','.join(map(str, scales))} needs a multi-scale model trained at "
                             f"those distinct scales, including its own x{model.scale} (this one: {model.arch}"
                             f"{', trained at x' + ', x'.join(map(str, trained)) if trained else ''})")
    extra: dict[str, object] = {"name": name}
    if fold_bit_bias:
        model.fold_bit_bias(fold_bit_bias)
        extra["bit_bias_folded"] = repr(float(fold_bit_bias))
    bit_floor = list(dict.fromkeys(bit_floor or []))
    if bit_floor:
        try:
            model.fold_bit_floor(bit_floor)
        except ValueError as e:
            raise SystemExit(f"{ckpt}: --bit-floor: {e}") from None
        extra["bit_floor"] = list(bit_floor)
    stored = stored_tensors(model, ckpt, storage)
    check_measured(model, stored, ckpt, storage, eval_json, fold_bit_bias, bool(bit_floor))
    weights_dir.mkdir(parents=True, exist_ok=True)
    out = weights_dir / f"{name}.safetensors"
    write_weights(model, ckpt, out, storage, extra, stored)
    sha = file_sha256(out)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    manifest_path = weights_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": []}
    stages = [_stage_info(r) for r in runs]
    entries = {}
    for scale in scales or [model.scale]:
        entry_name = model_entry_name(name, scale, bool(scales))
        old = next((m for m in manifest["models"] if m["name"] == entry_name), {})
        metrics = dict(old.get("metrics", {})) if old.get("sha256") == sha else {}  # measured these weights
        for e in eval_json:
            for ds, modes in _metrics_from_eval(e, scale if scales else None).items():
                metrics.setdefault(ds, {}).update(modes)
        entry = {
            "name": entry_name, "file": out.name, "arch": model.arch, "scale": scale, "act_grid": model.act_grid,
            "skip": model.skip, "sha256": sha, "params": params,
            "data": data, "license": "MIT (weights trained by the cadyq project)",
            "stages": stages or old.get("stages", []), "metrics": metrics, "notes": notes or old.get("notes", ""),
        }
        if model.act_shift:
            entry["act_shift"] = "channel"  # its selectors quantize after a learned per-channel shift (--act-shift)
        if scales:
            entry["scales"] = list(scales)  # the one file serves these entries
        if storage != "float32":
            entry["storage"] = storage
        if fold_bit_bias:
            entry["bit_bias_folded"] = float(fold_bit_bias)
        if bit_floor:
            entry["bit_floor"] = list(bit_floor)  # these selectors always pick 8 bits
        for key, value in (("recipe", recipe), ("backbone", backbone)):
            if value or old.get(key):
                entry[key] = value or old[key]
        entries[scale] = entry
    names = {e["name"] for e in entries.values()}
    manifest["models"] = [m for m in manifest["models"] if m["name"] not in names] + list(entries.values())
    manifest["models"].sort(key=lambda m: m["name"])
    _write_manifest(manifest_path, manifest)
    return entries[model.scale]


def export_backbone(ckpt: Path, name: str, weights_dir: Path) -> dict:
    """Write the full-precision model of an ``fp`` training checkpoint, weights only and bit-identical,
    to ``<weights_dir>/backbones/<name>.safetensors`` and list it under ``backbones`` in the manifest.

    A later lineage starts from it with ``cadyq train pams|fp --init FILE`` (optimizer state is not
    kept: every lineage restarted its optimizer at ``--init`` anyway).
    """
    if not (Path(ckpt).parent / "last.pt").is_file():  # the run folder gives the record (steps, minutes, validation)
        raise SystemExit(f"{ckpt}: a backbone comes from an fp run's checkpoint, RUN/last.pt")
    st = load_state(ckpt)
    cfg = st["config"]
    if cfg.get("stage") != "fp":
        raise SystemExit(f"{ckpt}: a backbone comes from an fp checkpoint, not a {cfg.get('stage')} one")
    out = weights_dir / "backbones" / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    run = Path(cfg["run_dir"]).name
    arch = get_arch(cfg["arch"]).arch  # the registered name, not the command line's alias ("edsr")
    save_state_dict(st["model"], out, {"name": name, "arch": arch, "scale": str(cfg["scale"]), "stage": "fp",
                                       "source": f"{run} step {int(st['step'])}"})
    entry = {"name": name, "file": f"backbones/{out.name}", "arch": arch, "scale": cfg["scale"],
             "sha256": file_sha256(out), **_stage_info(Path(ckpt).parent), "run": run}
    manifest_path = weights_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": []}
    manifest["backbones"] = sorted([b for b in manifest.get("backbones", []) if b["name"] != name] + [entry],
                                   key=lambda b: b["name"])
    _write_manifest(manifest_path, manifest)
    return entry


def _write_manifest(path: Path, manifest: dict) -> None:
    """Write the manifest atomically (temporary file, then rename): never a half-written manifest."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--weights-dir", type=Path, default=Path(__file__).resolve().parents[2] / "weights")
    p.add_argument("--run", type=Path, action="append", default=[])
    p.add_argument("--eval", type=Path, action="append", default=[])
    p.add_argument("--data", default="T91 + BSD200 + BSDS500test (490 images of ../shared/data/train; 10 held out for validation)")
    p.add_argument("--notes", default="")
    p.add_argument("--fold-bit-bias", type=float, default=0.0,
                   help="fold this compute-dial bias into the selectors (an operating point chosen on non-benchmark data)")
    p.add_argument("--bit-floor", default="",
                   help="floor these selectors at 8 bits (comma list of names, e.g. body.0.bitsel1; chosen on "
                        "non-benchmark data: bench/layer_floors.py)")
    p.add_argument("--backbone", action="store_true", help="export an fp checkpoint as a backbone (weights/backbones/)")
    p.add_argument("--storage", choices=sorted(STORAGE_DTYPES), default="float32",
                   help="how the file stores the weights (float16: half the size; evaluate the stored file)")
    p.add_argument("--scales", default="", help="a multi-scale model: one file, an entry NAME-xS per scale (e.g. 2,3,4)")
    a = p.parse_args()
    if a.backbone and (a.fold_bit_bias or a.bit_floor):
        p.error("--fold-bit-bias and --bit-floor fold into selectors: a backbone (--backbone) has none trained")
    if a.backbone and a.storage != "float32":
        p.error("--storage is for model exports: a backbone (--backbone) is kept bit for bit")
    if a.backbone:
        e = export_backbone(a.ckpt, a.name, a.weights_dir)
        print(json.dumps({k: e[k] for k in ("name", "file", "sha256")}))  # noqa: T201
        return
    try:
        scales = [int(s) for s in a.scales.split(",")] if a.scales else None
    except ValueError:
        p.error(f"--scales takes scales like 2,3,4, not {a.scales}")
    floors = [n.strip() for n in a.bit_floor.split(",") if n.strip()]
    e = export(a.ckpt, a.name, a.weights_dir, a.run, a.eval, a.data, a.notes, fold_bit_bias=a.fold_bit_bias,
               scales=scales, storage=a.storage, bit_floor=floors)
    print(json.dumps({k: e[k] for k in ("name", "file", "sha256", "params")}))  # noqa: T201


if __name__ == "__main__":
    main()
