"""File-level pipeline: plan input→output pairs, then read → upscale → reattach alpha → write."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .engine import ImageReport, TilingConfig, upscale_array
from .errors import CadyqError, ImageWriteError
from .io import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS, read_image, write_image
from .models._base import SRModel

__all__ = ["Job", "plan_jobs", "upscale_file", "INPUT_EXTS"]

INPUT_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


@dataclass(frozen=True)
class Job:
    """One input file and the output it becomes."""

    src: Path
    dst: Path


def _out_name(rel: Path, suffix: str, ext: str | None) -> Path:
    new_ext = ("." + ext.lstrip(".")) if ext else rel.suffix
    return rel.with_name(rel.stem + suffix + new_ext)


def plan_jobs(src: Path, dst: Path, recursive: bool = False, suffix: str = "", ext: str | None = None) -> list[Job]:
    """Pairs of (input, output) for a file→file or folder→folder run.

    Raises:
        CadyqError: input missing, folder to file, or an output extension we cannot write.
    """
    if ext is not None and "." + ext.lstrip(".").lower() not in OUTPUT_FORMATS:
        raise CadyqError(f"--ext {ext}: cannot write that format; use one of png, jpg, webp, tif, bmp")
    if src.is_file():
        if dst.is_dir():
            dst = dst / _out_name(Path(src.name), suffix or "", ext)
        elif suffix or ext:
            dst = dst.parent / _out_name(Path(dst.name), suffix, ext)
        return [Job(src, dst)]
    if not src.exists():
        raise CadyqError(f"{src}: no such file or folder")
    if dst.exists() and not dst.is_dir():
        raise CadyqError(f"{dst}: the input is a folder, so the output must be a folder")
    pattern = src.rglob("*") if recursive else src.glob("*")
    files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in INPUT_EXTS and not p.name.startswith("."))
    try:  # never descend into our own output folder
        dst_res = dst.resolve()
        files = [p for p in files if dst_res not in p.resolve().parents]
    except OSError:
        pass
    return [Job(p, dst / _out_name(p.relative_to(src), suffix, ext)) for p in files]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def upscale_file(
    model: SRModel,
    job: Job,
    cfg: TilingConfig,
    overwrite: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ImageReport, list[str]]:
    """Upscale one file; returns the report and warnings. Never leaves a partial output.

    Alpha is upscaled separately (bicubic) and reattached; grayscale stays grayscale; 16-bit
    stays 16-bit (PNG/TIFF); ICC profile and EXIF (orientation reset) are carried over.
    """
    if _same_file(job.src, job.dst):
        raise ImageWriteError(f"{job.dst}: refusing to overwrite the input file")
    if job.dst.exists() and not overwrite:
        raise ImageWriteError(f"{job.dst}: output exists (use --overwrite or --skip-existing)")
    img = read_image(job.src, max_pixels=max_pixels)
    # 8-bit colour output is rounded tile by tile into a uint8 canvas (gray averages the
    # channels before rounding, 16-bit keeps the fraction: those stay float)
    canvas = "uint8" if img.bit_depth == 8 and not img.gray else "float32"
    sr, report = upscale_array(model, img.rgb, cfg, progress, out_dtype=canvas)
    alpha = None
    if img.alpha is not None:
        s = model.scale
        alpha = cv2.resize(img.alpha.astype(np.float32), (img.width * s, img.height * s), interpolation=cv2.INTER_CUBIC)
        alpha = np.clip(alpha, 0.0, 1.0)
    try:
        job.dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (job.dst.parent, *job.dst.parent.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is not a directory" if blocker is not None else (e.strerror or str(e)).lower()
        raise ImageWriteError(f"cannot write {job.dst}: {why}") from None
    warnings = list(img.warnings)
    warnings += write_image(
        job.dst, sr, alpha=alpha, gray=img.gray, bit_depth=img.bit_depth, icc_profile=img.icc_profile,
        exif=img.exif, overwrite=overwrite,
    )
    return report, warnings
