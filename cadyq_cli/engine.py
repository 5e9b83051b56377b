"""The one pipeline behind ``upscale``, ``bitmap`` and ``eval``: tiles → quantized model → stitch → report.

Array convention: images are (H, W, 3) float32 RGB on the 0..255 scale (see ``io.py``); the
returned SR image is clamped to [0, 255] but not rounded, so 16-bit outputs keep precision.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import numpy as np
import torch

from .models._base import SRModel
from .quant.cost import cost_table
from .quant.intconv import kernels_of
from .quant.regions import RegionGrid
from .report import ImageReport, RegionBits, build_report
from .tiling import TILINGS, Tile, TilingConfig, plan_tiles

__all__ = ["TilingConfig", "upscale_array", "TILINGS"]


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
    bits_only: bool = False,
) -> tuple[np.ndarray | None, ImageReport]:
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
    cfg.validate(quantized=model.mode.quantized)
    t0 = time.perf_counter()
    h, w = rgb.shape[:2]
    s = model.scale
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None].to(device)
    n_sel = model.n_selectors if model.mode.quantized else 0

    tiles, region = plan_tiles(h, w, s, cfg, model.receptive_radius)
    out = None if bits_only else torch.empty((h * s, w * s, 3), dtype=getattr(torch, out_dtype), device=device)
    regions = RegionBits(h, w, region)

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
        if bits_only:
            with model.bits_only():
                sr, bits = model(xb, grid)
        else:
            sr, bits = model(xb, grid)
        if bits.dim() == 2:
            bits = bits.reshape(bits.shape[0], bits.shape[1], 1, 1)
        bits_list = [bits[k : k + 1] for k in range(len(bt))]
        if out is not None:
            sr = sr.clamp_(0, 255)
            if out_dtype == "uint8":
                sr = sr.nan_to_num_(0.0).round_()  # exact integers: the cast below does not truncate
        for k, t in enumerate(bt):
            if out is not None:
                oy0, oy1, ox0, ox1 = t.out_box
                out[oy0:oy1, ox0:ox1] = sr[k, :, t.src_y : t.src_y + oy1 - oy0, t.src_x : t.src_x + ox1 - ox0].permute(1, 2, 0)
            regions.add_tile(t, bits_list[k][0].cpu().numpy())  # (n_sel, nh, nw)
        done += len(bt)
        if progress is not None:
            progress(done, len(tiles))

    mode = model.mode
    report = build_report(regions, n_sel, s, cost_table(model), mode.name, mode.quantized, mode.act_bits, cfg.tiling,
                          time.perf_counter() - t0, kernels=kernels_of(model) if mode.quantized else "float",
                          fp_layers=model.fp_layers, bit_bias=model.bit_bias if mode.dynamic else 0.0)
    return (None if out is None else out.cpu().numpy()), report
