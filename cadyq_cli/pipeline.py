"""File-level pipeline for one job: read → upscale (or draw the bit heatmap) → reattach alpha → write.

Planning jobs is :mod:`cadyq_cli.paths`; running many is :mod:`cadyq_cli.batch`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .errors import CadyqError, ImageWriteError
from .io import DEFAULT_MAX_PIXELS, PNG_LEVEL, LoadedImage, encode_image, read_image, write_image
from .paths import STDIO, Job, check_output
from .report import ImageReport, bit_heatmap
from .tiling import TilingConfig

if TYPE_CHECKING:  # annotations only: the OpenVINO runtime runs without PyTorch
    from .models._base import SRModel
    from .runtime.engine import OVModel

__all__ = ["upscale_file", "bitmap_file"]


def _read(job: Job, max_pixels: int | None) -> LoadedImage:
    if job.stdin:
        return read_image(STDIO, max_pixels=max_pixels, data=sys.stdin.buffer.read())
    return read_image(job.src, max_pixels=max_pixels)


def upscale_file(
    model: SRModel | OVModel,
    job: Job,
    cfg: TilingConfig,
    overwrite: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
    target_fab: float | None = None,
    png_level: int = PNG_LEVEL,
) -> tuple[ImageReport, list[str]]:
    """Upscale one file; returns the report and warnings. Never leaves a partial output.

    Alpha is upscaled separately (bicubic) and reattached; grayscale stays grayscale; 16-bit
    stays 16-bit (PNG/TIFF); ICC profile and EXIF (orientation reset) are carried over.
    ``job.stdin`` reads the input from stdin; ``job.stdout_ext`` writes the output to stdout.
    With ``target_fab`` the bit bias is fitted to that FAB for this image (:mod:`cadyq_cli.dial`);
    ``png_level``: zlib level of a PNG output.
    ``model`` is a PyTorch backbone, or an object with its own ``upscale_array(rgb, cfg, progress,
    out_dtype)`` (the OpenVINO runtime, :mod:`cadyq_cli.runtime`).
    """
    check_output(job, overwrite)
    img = _read(job, max_pixels)
    # 8-bit colour output is rounded tile by tile into a uint8 canvas (gray averages the
    # channels before rounding, 16-bit keeps the fraction: those stay float)
    canvas = "uint8" if img.bit_depth == 8 and not img.gray else "float32"
    if hasattr(model, "upscale_array"):  # the OpenVINO runtime brings its own engine
        if target_fab is not None:
            raise CadyqError("--target-fab runs on the PyTorch kernels (not --kernels openvino) for now")
        sr, report = model.upscale_array(img.rgb, cfg, progress, out_dtype=canvas)
    elif target_fab is None:
        from .engine import upscale_array

        sr, report = upscale_array(model, img.rgb, cfg, progress, out_dtype=canvas)
    else:
        from .dial import upscale_to_fab

        sr, report = upscale_to_fab(model, img.rgb, cfg, target_fab, progress, out_dtype=canvas)
    alpha = None
    if img.alpha is not None:
        s = model.scale
        import cv2  # local: only an alpha channel needs it

        alpha = cv2.resize(img.alpha.astype(np.float32), (img.width * s, img.height * s), interpolation=cv2.INTER_CUBIC)
        alpha = np.clip(alpha, 0.0, 1.0)
    meta = dict(alpha=alpha, gray=img.gray, bit_depth=img.bit_depth, icc_profile=img.icc_profile, exif=img.exif,
                png_level=png_level)
    return report, list(img.warnings) + _write(job, sr, overwrite, **meta)


def bitmap_file(
    model: SRModel | OVModel,
    job: Job,
    cfg: TilingConfig,
    layer: int | None = None,
    overwrite: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
    png_level: int = PNG_LEVEL,
) -> tuple[ImageReport, list[str]]:
    """Draw one file's bit-allocation heatmap (mean bits per region, or selector ``layer``'s) to
    ``job.dst`` (a PNG at zlib level ``png_level``); the bits are chosen without running the upsampling tail.
    Never leaves a partial output."""
    check_output(job, overwrite)
    img = _read(job, max_pixels)
    if hasattr(model, "upscale_array"):  # the OpenVINO runtime brings its own engine
        _, report = model.upscale_array(img.rgb, cfg, progress, bits_only=True)
    else:
        from .engine import upscale_array

        _, report = upscale_array(model, img.rgb, cfg, progress, bits_only=True)
    pic = bit_heatmap(img.rgb, report, layer)
    return report, list(img.warnings) + _write(job, pic.astype(np.float32), overwrite, png_level=png_level)


def _write(job: Job, rgb: np.ndarray, overwrite: bool, **meta: object) -> list[str]:
    """Write ``rgb`` (and ``meta``: alpha, gray, bit depth, ICC, EXIF, PNG level) to the job's output or stdout; warnings."""
    if job.stdout_ext is not None:
        data, warnings = encode_image(Path(STDIO + job.stdout_ext), rgb, **meta)  # type: ignore[arg-type]
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return warnings
    try:
        job.dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # check_output saw no file in the way: a race or a permission
        raise ImageWriteError(f"cannot write {job.dst}: {(e.strerror or str(e)).lower()}") from None
    return write_image(job.dst, rgb, overwrite=overwrite, **meta)  # type: ignore[arg-type]
