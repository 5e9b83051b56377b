"""The one pipeline behind ``upscale``, ``bitmap`` and ``eval``: tiles → quantized model → stitch → report.

Array convention: images are (H, W, 3) float32 RGB on the 0..255 scale (see ``io.py``); the
returned SR image is clamped to [0, 255] but not rounded, so 16-bit outputs keep precision.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from .models._base import SRModel
from .quant.cost import bitops, cost_table, fab
from .quant.intconv import kernels_of
from .quant.modules import RegionGrid
from .tiling import Tile, plan_paper, plan_seamless

__all__ = ["TilingConfig", "RegionStats", "ImageReport", "upscale_array", "TILINGS"]

TILINGS = ("seamless", "paper", "whole")


@dataclass(frozen=True)
class TilingConfig:
    """How an image is cut into network calls.

    Attributes:
        tiling: ``seamless`` (default), ``paper`` (official 96/90 patches) or ``whole``.
        tile: seamless: core tile size in LR px (rounded down to a multiple of ``region``);
            paper: patch size (default 96).
        overlap: paper: overlap between patches in LR px (default 6, i.e. step 90).
        region: seamless: bits are chosen per ``region`` x ``region`` LR px.
        batch: tiles of equal shape run together in one forward, up to this many and up to
            ``batch_pixels`` LR input pixels (big tiles gain nothing from batching and would
            multiply the memory).
    """

    tiling: str = "seamless"
    tile: int | None = None
    overlap: int = 6
    region: int = 96
    batch: int = 8
    batch_pixels: int = 1 << 17

    def validate(self) -> None:
        """Raise ValueError for an impossible setting."""
        if self.tiling not in TILINGS:
            raise ValueError(f"unknown tiling {self.tiling!r}; choose one of {', '.join(TILINGS)}")
        if self.tile is not None and self.tile < 1:
            raise ValueError("--tile must be at least 1")
        if self.region < 1:
            raise ValueError("--region must be at least 1")
        if self.overlap < 0 or (self.tiling == "paper" and self.overlap >= (self.tile or 96)):
            raise ValueError("--overlap must be >= 0 and smaller than --tile")
        if self.batch < 1:
            raise ValueError("batch must be at least 1")


#: Seamless core tile size (LR px) when none is given: big enough that context is cheap,
#: small enough that x4 tail activations stay near 1 GB.
DEFAULT_SEAMLESS_TILE = 384


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

    def region_fab_map(self) -> np.ndarray:
        """(rows, cols) array of region FABs (row-major grid of ``regions``)."""
        return np.array([r.fab for r in self.regions], dtype=np.float64).reshape(self.grid)

    def to_dict(self) -> dict:
        """JSON-ready dict (regions as lists)."""
        d = asdict(self)
        d["regions"] = [{"box": list(r.box), "fab": r.fab, "bits": r.bits} for r in self.regions]
        return d


def _image_grid(length: int, region: int) -> np.ndarray:
    return np.arange(length) // region


def _local_grid(tile: Tile, region: int, device: torch.device) -> tuple[RegionGrid | None, int, int]:
    y0, y1, x0, x1 = tile.in_box
    ry = _image_grid(y1, region)[y0:y1]
    rx = _image_grid(x1, region)[x0:x1]
    if ry[0] == ry[-1] and rx[0] == rx[-1]:
        return None, int(ry[0]), int(rx[0])
    grid = RegionGrid(torch.from_numpy(ry - ry[0]).to(device), torch.from_numpy(rx - rx[0]).to(device))
    return grid, int(ry[0]), int(rx[0])


@torch.inference_mode()
def upscale_array(
    model: SRModel,
    rgb: np.ndarray,
    cfg: TilingConfig = TilingConfig(),
    progress: Callable[[int, int], None] | None = None,
    out_dtype: str = "float32",
) -> tuple[np.ndarray, ImageReport]:
    """Super-resolve one image.

    Args:
        model: a backbone in eval mode, in the wanted quantization mode.
        rgb: (H, W, 3) float32 RGB on 0..255.
        cfg: tiling settings.
        progress: called with (tiles done, tiles total) after each batch.
        out_dtype: ``"float32"``, or ``"uint8"`` to round each tile (half to even, as
            :func:`~cadyq_cli.io.write_image` does) into an 8-bit canvas: a quarter of the memory
            for the largest buffer of a run.

    Returns:
        (SR image (sH, sW, 3) clamped to [0, 255], C-contiguous, of ``out_dtype``; report).
    """
    if out_dtype not in ("float32", "uint8"):
        raise ValueError(f"out_dtype must be 'float32' or 'uint8', got {out_dtype!r}")
    cfg.validate()
    t0 = time.perf_counter()
    h, w = rgb.shape[:2]
    s = model.scale
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None].to(device)
    n_sel = model.n_selectors if model.mode.quantized else 0

    if cfg.tiling == "paper":
        tiles = plan_paper(h, w, s, cfg.tile or 96, cfg.overlap)
        region = None
    elif cfg.tiling == "whole":
        tiles = [Tile((0, h, 0, w), (0, h * s, 0, w * s), 0, 0, (0, h, 0, w))]
        region = None
    else:
        region = cfg.region
        tiles = plan_seamless(h, w, s, cfg.tile or DEFAULT_SEAMLESS_TILE, model.receptive_radius, region)

    out = torch.empty((h * s, w * s, 3), dtype=getattr(torch, out_dtype), device=device)
    # per-region bits: key (row, col) -> (box, bits tensor (n_sel,))
    region_bits: dict[tuple[int, int], torch.Tensor] = {}
    region_boxes: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    # tiles run together when they have the same shape and the same region layout
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, t in enumerate(tiles):
        layout = (0, 0) if region is None else (t.in_box[0] % region, t.in_box[2] % region)
        groups[(*t.in_shape, *layout)].append(i)
    batches = []
    for key, idx in groups.items():  # up to cfg.batch tiles and cfg.batch_pixels LR pixels per forward
        n = max(1, min(cfg.batch, cfg.batch_pixels // max(1, key[0] * key[1])))
        batches += [idx[k : k + n] for k in range(0, len(idx), n)]
    batches.sort(key=lambda b: b[0])

    done = 0
    for b in batches:
        bt = [tiles[i] for i in b]
        grid = None if region is None else _local_grid(bt[0], region, device)[0]
        xb = torch.cat([x[:, :, t.in_box[0] : t.in_box[1], t.in_box[2] : t.in_box[3]] for t in bt])
        sr, bits = model(xb, grid)
        if bits.dim() == 2:
            bits = bits.reshape(bits.shape[0], bits.shape[1], 1, 1)
        bits_list = [bits[k : k + 1] for k in range(len(bt))]
        sr = sr.clamp_(0, 255)
        if out_dtype == "uint8":
            sr = sr.nan_to_num_(0.0).round_()  # exact integers: the cast below does not truncate
        for k, t in enumerate(bt):
            oy0, oy1, ox0, ox1 = t.out_box
            out[oy0:oy1, ox0:ox1] = sr[k, :, t.src_y : t.src_y + oy1 - oy0, t.src_x : t.src_x + ox1 - ox0].permute(1, 2, 0)
            bk = bits_list[k][0]  # (n_sel, nh, nw)
            if region is None:
                key = (t.core[0], t.core[2])
                cy0, cy1, cx0, cx1 = t.core
                region_boxes[key] = (cx0, cy0, min(cx1, w), min(cy1, h))
                region_bits[key] = bk[:, 0, 0]
            else:
                _, ty0, tx0 = _local_grid(t, region, device)
                cy0, cy1, cx0, cx1 = t.core
                for ry in range(cy0 // region, -(-cy1 // region)):
                    for rx in range(cx0 // region, -(-cx1 // region)):
                        ly, lx = ry - ty0, rx - tx0
                        region_bits[(ry, rx)] = bk[:, min(ly, bk.shape[1] - 1), min(lx, bk.shape[2] - 1)]
                        region_boxes[(ry, rx)] = (rx * region, ry * region, min((rx + 1) * region, w), min((ry + 1) * region, h))
        done += len(bt)
        if progress is not None:
            progress(done, len(tiles))

    keys = sorted(region_bits)
    rows = sorted({k[0] for k in keys})
    cols = sorted({k[1] for k in keys})
    rb = torch.stack([region_bits[k] for k in keys]).cpu() if n_sel else torch.zeros((len(keys), 0))
    boxes = [region_boxes[k] for k in keys]
    px = torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes], dtype=torch.float64)
    table = cost_table(model)
    mode = model.mode
    if not mode.quantized:
        ops = bitops(table, px, None, 32)
    elif mode.dynamic:
        ops = bitops(table, px, rb)
    else:
        ops = bitops(table, px, None, mode.act_bits)
    hist = {"4": 0, "6": 0, "8": 0}
    for b in (4, 6, 8):
        hist[str(b)] = int((rb == b).sum())
    regions = [
        RegionStats(box, [int(v) for v in rb[i].tolist()], fab(rb[i : i + 1]) if n_sel else 32.0)
        for i, box in enumerate(boxes)
    ]
    report = ImageReport(
        width=w, height=h, scale=s, mode=mode.name, tiling=cfg.tiling, n_selectors=n_sel,
        fab=fab(rb) if n_sel else 32.0, bits_histogram=hist, bitops=ops, bitops_fp32=bitops(table, px, None, 32),
        seconds=time.perf_counter() - t0, grid=(len(rows), len(cols)), regions=regions,
        kernels=kernels_of(model) if mode.quantized else "float",
    )
    return out.cpu().numpy(), report
