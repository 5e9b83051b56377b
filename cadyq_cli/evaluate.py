"""The benchmark protocol behind ``cadyq eval``: PSNR/SSIM on Y, FAB and BitOPs per dataset.

Protocol (the one of the SR papers and of the official CADyQ test loop, spec §10):

* every HR image of a dataset folder (png, jpg, bmp, tif; sorted by name) is read as RGB
  uint8 (gray images are replicated to three channels) and cropped top-left to a multiple
  of the scale;
* LR = MATLAB ``imresize(hr, 1/scale, 'bicubic')`` in uint8 (:mod:`cadyq_cli.resize`),
  made once per image and shared by all modes;
* SR = the model in each quantization mode through :func:`cadyq_cli.engine.upscale_array`
  (``paper`` tiling by default: the official 96/90 patches), clamped and rounded to uint8; or, given a
  ``runtime``, the OpenVINO runtime's model of each mode (``cadyq eval --kernels openvino``: the runtime
  ``cadyq upscale`` uses by default for shipped EDSR-baseline and CARN models);
* PSNR and SSIM on Y with a ``scale`` px border ignored (:mod:`cadyq_cli.metrics`);
* FAB (32 for fp32) and BitOPs per image; a dataset row is the unweighted mean over images.

The ``bicubic`` row is ``imresize(lr, scale)`` against HR (no FAB, no BitOPs). A mode
``dynamic@B`` is the dynamic mode with the compute dial at bit bias ``B`` (:mod:`cadyq_cli.dial`).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol

import numpy as np

from .checkpoint import weights_digest
from .engine import TILINGS, TilingConfig, upscale_array
from .errors import CadyqError
from .io import INPUT_EXTENSIONS, read_image
from .metrics import psnr_y, ssim_y
from .models._base import SRModel
from .quant.intconv import kernels_of
from .quant.modes import MODES, parse_mode
from .quant.modules import set_quant_mode
from .report import ImageReport
from .resize import imresize

__all__ = [
    "EvalInputError", "ImageResult", "DatasetResult", "EvalResult", "Upscaler",
    "list_images", "evaluate", "results_to_json", "write_csv", "split_mode",
]


#: ``progress(done, total, label)``: called after each (image, mode) step.
Progress = Callable[[int, int, str], None]


class Upscaler(Protocol):
    """A model of another runtime in one mode (:class:`cadyq_cli.runtime.engine.OVModel`): how ``evaluate`` runs it.
    ``quant_kernels``: how that runtime runs quantized convs (the result's ``kernels``, whatever the mode)."""

    quant_kernels: str

    def upscale_array(self, rgb: np.ndarray, cfg: TilingConfig) -> tuple[np.ndarray | None, ImageReport]: ...


class EvalInputError(CadyqError):
    """The evaluation cannot start: a missing folder, a folder without images, a bad option."""


@dataclass
class ImageResult:
    """Scores of one image in one mode. ``fab``/``bitops`` are None for bicubic."""

    name: str
    psnr: float
    ssim: float
    fab: float | None = None
    bitops: float | None = None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals or len(vals) != len(values):
        return None
    return float(np.mean(vals))  # inf if any image is identical, as it should be


@dataclass
class DatasetResult:
    """One dataset in one mode (``bicubic``, ``fp32``, ``w8a8``, ...)."""

    dataset: str
    mode: str
    images: list[ImageResult] = field(default_factory=list)

    @property
    def psnr(self) -> float:
        """Mean PSNR (dB) over images."""
        return float(np.mean([i.psnr for i in self.images]))

    @property
    def ssim(self) -> float:
        """Mean SSIM over images."""
        return float(np.mean([i.ssim for i in self.images]))

    @property
    def fab(self) -> float | None:
        """Unweighted mean FAB over images (None for bicubic)."""
        return _mean([i.fab for i in self.images])

    @property
    def bitops(self) -> float | None:
        """Mean BitOPs per image (None for bicubic)."""
        return _mean([i.bitops for i in self.images])


@dataclass
class EvalResult:
    """Everything ``cadyq eval`` measured; ``results`` are ordered dataset by dataset."""

    scale: int
    model: str | None
    tiling: str
    results: list[DatasetResult] = field(default_factory=list)
    kernels: str = "float"  # how quantized convs ran: int8 codes or fake-quantized float
    weights_digest: str | None = None  # the evaluated model's tensors (:func:`cadyq_cli.checkpoint.weights_digest`)


def split_mode(m: str) -> tuple[str, float | None]:
    """``"dynamic@2.5"`` -> ``("dynamic", 2.5)``; a plain mode -> ``(mode, None)``.

    Raises:
        EvalInputError: an unknown mode, or a bias on a mode other than dynamic.
    """
    base, at, bias = m.partition("@")
    if base not in MODES:
        raise EvalInputError(f"unknown mode {base!r}; choose one of {', '.join(MODES)} (or dynamic@BIAS)")
    if not at:
        return base, None
    try:
        value = float(bias)
    except ValueError:
        value = float("nan")
    if base != "dynamic" or not math.isfinite(value):
        raise EvalInputError(f"{m!r}: a bit bias goes with the dynamic mode, as dynamic@NUMBER")
    return base, value


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; EvalInputError if none or no folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalInputError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in INPUT_EXTENSIONS)
    if not files:
        raise EvalInputError(f"{folder}: no images (looked for {', '.join(INPUT_EXTENSIONS)})")
    return files


def _read_rgb_uint8(path: Path) -> np.ndarray:
    # read_image replicates gray to 3 channels and gives exact integers for 8-bit files
    return np.clip(np.rint(read_image(path).rgb), 0, 255).astype(np.uint8)


def _to_uint8(sr: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(sr, 0, 255)).astype(np.uint8)


def evaluate(
    data_dirs: list[Path],
    scale: int,
    model: SRModel | None,
    modes: list[str],
    bicubic: bool,
    tiling: str = "paper",
    progress: Progress | None = None,
    model_name: str | None = None,
    limit: int = 0,
    round_y: bool = False,
    runtime: Mapping[str, Upscaler] | None = None,
) -> EvalResult:
    """Run the benchmark protocol (module docstring) on each dataset folder.

    Args:
        data_dirs: dataset folders of HR images; a dataset is named after its folder.
        scale: upscaling factor (must be the model's).
        model: the network, or None to evaluate bicubic only.
        modes: quantization modes to run the model in (``fp32``, ``w8a8``, ``w8a6``,
            ``w8a4``, ``dynamic``); ignored without a model.
        bicubic: also score MATLAB bicubic upsampling.
        tiling: ``paper`` (official patches, default), ``seamless`` or ``whole``.
        progress: ``progress(done, total, label)`` after each image and mode.
        model_name: name recorded in the result (default: the model's architecture).
        limit: evaluate only the first ``limit`` images (sorted by name) of each folder; 0: all.
        round_y: round Y to integers before PSNR/SSIM (MATLAB ``rgb2ycbcr`` on uint8 images).
        runtime: per mode, the same weights on another runtime that runs that mode instead of ``model``
            (``model`` still names the result and gives its weights digest); it must hold every mode.

    Returns:
        One :class:`DatasetResult` per dataset and mode (bicubic first).

    Raises:
        EvalInputError: missing folder, folder without images, unknown mode or tiling,
            scale not matching the model, nothing to evaluate.
        CadyqError: an image cannot be read.
    """
    if scale < 1:
        raise EvalInputError("--scale must be a positive integer")
    if tiling not in TILINGS:
        raise EvalInputError(f"unknown tiling {tiling!r}; choose one of {', '.join(TILINGS)}")
    mode_list = list(dict.fromkeys(modes)) if model is not None else []
    parsed = {m: split_mode(m) for m in mode_list}
    if model is not None and model.scale != scale:
        raise EvalInputError(f"the model is x{model.scale}, not x{scale}")
    if not bicubic and not mode_list:
        raise EvalInputError("nothing to evaluate: give a model with modes, or --bicubic")
    if runtime is not None and set(mode_list) - set(runtime):
        raise EvalInputError(f"the runtime runs --modes {', '.join(runtime)}, not {', '.join(sorted(set(mode_list) - set(runtime)))}")
    datasets = [(Path(d).name or str(d), list_images(Path(d))[: limit or None]) for d in data_dirs]  # validate all first

    cfg = TilingConfig(tiling=tiling)
    row_modes = (["bicubic"] if bicubic else []) + mode_list
    total = sum(len(files) for _, files in datasets) * len(row_modes)
    done = 0
    name = model_name if model_name is not None else (getattr(model, "arch", None) if model is not None else None)
    if runtime and mode_list:
        kernels = runtime[mode_list[0]].quant_kernels
    else:
        kernels = kernels_of(model) if model is not None else "float"
    result = EvalResult(scale=scale, model=name, tiling=tiling, kernels=kernels,
                        weights_digest=None if model is None else weights_digest(model))
    previous_mode = getattr(model, "mode", None)
    previous_bias = getattr(model, "bit_bias", 0.0)
    try:
        for ds_name, files in datasets:
            rows = {m: DatasetResult(ds_name, m) for m in row_modes}
            for path in files:
                hr = _read_rgb_uint8(path)
                h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
                if h == 0 or w == 0:
                    raise EvalInputError(f"{path}: smaller than the scale x{scale}")
                hr = hr[:h, :w]
                lr = imresize(hr, 1 / scale)
                for m in row_modes:
                    if m == "bicubic":
                        sr = imresize(lr, scale)
                        fab = bitops = None
                    else:
                        base, bias = parsed[m]
                        if runtime is not None:
                            out, report = runtime[m].upscale_array(lr.astype(np.float32), cfg)
                        else:
                            assert model is not None
                            set_quant_mode(model, base)
                            model.set_bit_bias(previous_bias if bias is None else bias)
                            out, report = upscale_array(model, lr.astype(np.float32), cfg)
                        assert out is not None
                        sr = _to_uint8(out)
                        fab = 32.0 if not parse_mode(base).quantized else float(report.fab)
                        bitops = float(report.bitops)
                    rows[m].images.append(
                        ImageResult(path.name, psnr_y(sr, hr, scale, round_y), ssim_y(sr, hr, scale, round_y), fab, bitops)
                    )
                    done += 1
                    if progress is not None:
                        progress(done, total, f"{ds_name}/{path.name} {m}")
            result.results.extend(rows[m] for m in row_modes)
    finally:
        if model is not None and previous_mode is not None:
            set_quant_mode(model, previous_mode)
            model.set_bit_bias(previous_bias)
    return result


def _num(x: float | None, digits: int | None = None) -> float | None:
    """JSON-safe number: None for missing or non-finite values (identical images give inf)."""
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


def _g(bitops: float | None) -> float | None:
    return None if bitops is None else bitops / 1e9


def results_to_json(result: EvalResult) -> dict:
    """JSON-ready dict: scale, model, tiling and one entry per dataset and mode with its images.

    ``bitops_g`` is BitOPs / 1e9 per image (dataset: mean over images); a PSNR of +inf
    (identical images) is written as null.
    """
    return {
        "scale": result.scale,
        "model": result.model,
        "tiling": result.tiling,
        "kernels": result.kernels,
        **({"weights_digest": result.weights_digest} if result.weights_digest else {}),
        "results": [
            {
                "dataset": r.dataset,
                "mode": r.mode,
                "psnr": _num(r.psnr),
                "ssim": _num(r.ssim),
                "fab": _num(r.fab),
                "bitops_g": _num(_g(r.bitops)),
                "images": [
                    {"name": i.name, "psnr": _num(i.psnr), "ssim": _num(i.ssim), "fab": _num(i.fab),
                     "bitops_g": _num(_g(i.bitops))}
                    for i in r.images
                ],
            }
            for r in result.results
        ],
    }


CSV_FIELDS = ("dataset", "image", "mode", "psnr", "ssim", "fab", "bitops_g")


def write_csv(result: EvalResult, path: str | Path) -> None:
    """One row per image and mode: dataset, image, mode, psnr, ssim, fab, bitops_g (empty if none)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(CSV_FIELDS)
        for r in result.results:
            for i in r.images:
                g = _g(i.bitops)
                wr.writerow([
                    r.dataset, i.name, r.mode, f"{i.psnr:.4f}", f"{i.ssim:.6f}",
                    "" if i.fab is None else f"{i.fab:.4f}", "" if g is None else f"{g:.6f}",
                ])
