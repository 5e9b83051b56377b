"""Report data for one image: what happened (:class:`ImageReport`), its JSON record and the
bit-allocation heatmap (as arrays).

Rendering to the terminal happens in ``cli.py``; this module only computes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .accounting import ConvCost, bitops, fab

if TYPE_CHECKING:
    from .tiling import Tile
__all__ = ["RegionStats", "ImageReport", "RegionBits", "build_report", "json_record", "failure_record", "region_bits_map", "bit_heatmap", "BIT_COLORS"]


@dataclass
class RegionStats:
    """Bits of one region. ``box`` is (x0, y0, x1, y1) in input pixels."""

    box: tuple[int, int, int, int]
    bits: list[int]
    fab: float


@dataclass
class ImageReport:
    """What happened to one image."""

    width: int
    height: int
    scale: int
    mode: str
    tiling: str
    n_selectors: int
    fab: float
    bits_histogram: dict[str, int]
    bitops: float
    bitops_fp32: float
    seconds: float
    grid: tuple[int, int]
    regions: list[RegionStats] = field(default_factory=list)
    kernels: str = "float"  # quantized convs on int8 codes ("int8") or fake-quantized floats
    fp_layers: str = "fp32"  # precision of the full-precision upsampling tail ("fp32" or "bf16")
    bit_bias: float = 0.0  # the compute dial the bits were chosen with (dynamic mode)
    target_fab: float | None = None  # the FAB target the bias was fitted to, if any
    probes: int = 0  # bits-only forwards spent fitting the bias to ``target_fab``

    def region_fab_map(self) -> np.ndarray:
        """(rows, cols) array of region FABs (row-major grid of ``regions``)."""
        return np.array([r.fab for r in self.regions], dtype=np.float64).reshape(self.grid)


class RegionBits:
    """Bits per region of one image, gathered tile by tile (each region from the tile whose core holds it)."""

    def __init__(self, h: int, w: int, region: int | None) -> None:
        self.h, self.w, self.region = h, w, region
        self.bits: dict[tuple[int, int], np.ndarray] = {}
        self.boxes: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    def add_tile(self, t: Tile, bk: np.ndarray) -> None:
        """Record tile ``t``'s bits ``bk`` (n_sel, nh, nw) over its local region grid."""
        h, w, region = self.h, self.w, self.region
        cy0, cy1, cx0, cx1 = t.core
        if region is None:
            key = (t.core[0], t.core[2])
            self.boxes[key] = (cx0, cy0, min(cx1, w), min(cy1, h))
            self.bits[key] = bk[:, 0, 0]
            return
        ty0, tx0 = t.in_box[0] // region, t.in_box[2] // region
        for ry in range(cy0 // region, -(-cy1 // region)):
            for rx in range(cx0 // region, -(-cx1 // region)):
                ly, lx = ry - ty0, rx - tx0
                self.bits[(ry, rx)] = bk[:, min(ly, bk.shape[1] - 1), min(lx, bk.shape[2] - 1)]
                self.boxes[(ry, rx)] = (rx * region, ry * region, min((rx + 1) * region, w), min((ry + 1) * region, h))


def build_report(regions: RegionBits, n_sel: int, scale: int, table: list[ConvCost], mode: str, quantized: bool,
                 act_bits: int | None, tiling: str, seconds: float, **extra: object) -> ImageReport:
    """The :class:`ImageReport` of one image from its regions' bits and the model's cost table
    (``extra``: the report's remaining fields, e.g. ``kernels``, ``fp_layers``, ``bit_bias``)."""
    keys = sorted(regions.bits)
    rows = sorted({k[0] for k in keys})
    cols = sorted({k[1] for k in keys})
    rb = np.stack([np.asarray(regions.bits[k], dtype=np.float64) for k in keys]) if n_sel else np.zeros((len(keys), 0))
    boxes = [regions.boxes[k] for k in keys]
    px = np.array([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes], dtype=np.float64)
    if not quantized:
        ops = bitops(table, px, None, 32)
    elif act_bits is None:
        ops = bitops(table, px, rb)
    else:
        ops = bitops(table, px, None, act_bits)
    hist = {str(b): int((rb == b).sum()) for b in (4, 6, 8)}
    stats = [RegionStats(box, [int(v) for v in rb[i].tolist()], fab(rb[i : i + 1]) if n_sel else 32.0)
             for i, box in enumerate(boxes)]
    return ImageReport(
        width=regions.w, height=regions.h, scale=scale, mode=mode, tiling=tiling, n_selectors=n_sel,
        fab=fab(rb) if n_sel else 32.0, bits_histogram=hist, bitops=ops, bitops_fp32=bitops(table, px, None, 32),
        seconds=seconds, grid=(len(rows), len(cols)), regions=stats, **extra,  # type: ignore[arg-type]
    )


#: Colour (RGB) of 4, 6 and 8 bits in the heatmap; values in between are interpolated.
BIT_COLORS = {4: (40, 110, 255), 6: (255, 210, 40), 8: (235, 40, 40)}


def json_record(report: ImageReport, input_path: str, output_path: str | None, model: str) -> dict:
    """The JSON object printed per image (``--json``); keys are part of the CLI interface."""
    return {
        "input": input_path,
        "output": output_path,
        "scale": report.scale,
        "model": model,
        "mode": report.mode,
        "tiling": report.tiling,
        "kernels": report.kernels,
        "fp_layers": report.fp_layers,
        "bit_bias": report.bit_bias,
        "target_fab": report.target_fab,
        "probes": report.probes,
        "width": report.width,
        "height": report.height,
        "fab": round(report.fab, 4),
        "bits_histogram": report.bits_histogram,
        "bitops_g": round(report.bitops / 1e9, 3),
        "bitops_fp32_g": round(report.bitops_fp32 / 1e9, 3),
        "seconds": round(report.seconds, 3),
        "regions": [{"box": list(r.box), "fab": round(r.fab, 4), "bits": r.bits} for r in report.regions],
    }


def failure_record(input_path: str, output_path: str | None, model: str, error: str) -> dict:
    """The JSON object printed (``--json``) for an image that failed: its one-line ``error``.

    A consumer tells the two kinds of line apart by the ``error`` key, which results never have.
    """
    return {"input": input_path, "output": output_path, "model": model, "error": error}


def region_bits_map(report: ImageReport, layer: int | None = None) -> np.ndarray:
    """(rows, cols) mean selected bits per region, or the bits of selector ``layer``."""
    if layer is None:
        return report.region_fab_map()
    if not 0 <= layer < report.n_selectors:
        raise ValueError(f"--layer must be between 0 and {report.n_selectors - 1}")
    return np.array([r.bits[layer] for r in report.regions], dtype=np.float64).reshape(report.grid)


def _bit_color(b: float) -> np.ndarray:
    b = min(max(b, 4.0), 8.0)
    lo, hi = (4, 6) if b <= 6 else (6, 8)
    t = (b - lo) / 2.0
    return (1 - t) * np.array(BIT_COLORS[lo], float) + t * np.array(BIT_COLORS[hi], float)


def bit_heatmap(rgb: np.ndarray, report: ImageReport, layer: int | None = None, min_width: int = 640) -> np.ndarray:
    """Bits per region drawn over a dimmed copy of the image, with a legend and the FAB.

    Args:
        rgb: (H, W, 3) float 0..255, the input image (the report's coordinates).
        report: the report of that image (dynamic or fixed mode).
        layer: show selector ``layer`` instead of the mean over selectors.
        min_width: the picture is enlarged (nearest) to at least this width for legibility.

    Returns:
        (H', W', 3) uint8 RGB picture.
    """
    import cv2  # local: only the heatmap needs it (keeps cv2 out of the upscale start-up)

    h, w = rgb.shape[:2]
    k = max(1, int(np.ceil(min_width / max(w, 1))))
    base = cv2.resize(np.clip(rgb, 0, 255).astype(np.uint8), (w * k, h * k), interpolation=cv2.INTER_NEAREST)
    gray = cv2.cvtColor(base, cv2.COLOR_RGB2GRAY).astype(np.float64)
    canvas = np.repeat((0.35 * gray + 40)[:, :, None], 3, axis=2)
    bits = region_bits_map(report, layer)
    overlay = np.zeros_like(canvas)
    for r, bmap in zip(report.regions, bits.ravel()):
        x0, y0, x1, y1 = (v * k for v in r.box)
        overlay[y0:y1, x0:x1] = _bit_color(float(bmap))
    out = 0.45 * canvas + 0.55 * overlay
    out = np.clip(out, 0, 255).astype(np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    fs = max(0.4, min(1.0, out.shape[1] / 900))
    th = max(1, int(round(fs * 2)))
    for r, bmap in zip(report.regions, bits.ravel()):  # region borders and values
        x0, y0, x1, y1 = (v * k for v in r.box)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (20, 20, 20), 1)
        if (x1 - x0) > 60 * fs and (y1 - y0) > 30 * fs:
            cv2.putText(out, f"{bmap:.1f}", (x0 + 4, y0 + int(22 * fs)), font, fs * 0.8, (255, 255, 255), th, cv2.LINE_AA)
    # legend strip below the image
    bar_h = int(44 * fs) + 10
    legend = np.full((bar_h, out.shape[1], 3), 25, np.uint8)
    x = 8
    for b in (4, 6, 8):
        cv2.rectangle(legend, (x, 8), (x + int(26 * fs), bar_h - 8), tuple(int(c) for c in BIT_COLORS[b]), -1)
        cv2.putText(legend, f"{b} bit", (x + int(32 * fs), bar_h // 2 + int(8 * fs)), font, fs, (235, 235, 235), th, cv2.LINE_AA)
        x += int(130 * fs)
    what = "mean bits over layers" if layer is None else f"layer {layer}"
    label = f"FAB {report.fab:.2f}"
    for candidate in (f"{label}  ({what}, x{report.scale}, {report.mode})", f"{label}  ({what})", label):
        (tw, _), _ = cv2.getTextSize(candidate, font, fs, th)
        if x + tw + 10 <= out.shape[1]:
            label = candidate
            break
    (tw, _), _ = cv2.getTextSize(label, font, fs, th)
    cv2.putText(legend, label, (max(x, out.shape[1] - tw - 10), bar_h // 2 + int(8 * fs)), font, fs, (235, 235, 235), th, cv2.LINE_AA)
    return np.concatenate([out, legend], axis=0)
