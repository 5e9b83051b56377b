"""Do bits follow content? Spearman rank correlation between a region's image gradient and its FAB.

For every image of the given folders, runs `cadyq`'s engine in dynamic mode with the paper
tiling (each 96x96 patch is a region), and correlates per region the CADyQ gradient feature
(mean |Sobel| of the gray LR patch) with the mean bits the selectors chose there.

Usage: python bench/bits_vs_gradient.py DATA_DIR [...] [--model edsr-baseline] [--scale 4] [--weights W]
DATA_DIR holds HR images; LR is made with MATLAB bicubic as in `cadyq eval`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from cadyq_cli.engine import TilingConfig, upscale_array
from cadyq_cli.models import grad_feature
from cadyq_cli.resize import imresize
from cadyq_cli.weights import load_model


def _ranks(a: np.ndarray) -> np.ndarray:
    order = a.argsort(kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(len(a))
    for v in np.unique(a):  # average ranks of ties
        m = a == v
        r[m] = r[m].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with tie handling."""
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    """Print per-dataset and overall rank correlations."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="+", type=Path)
    p.add_argument("--model", default="edsr-baseline")
    p.add_argument("--weights", default=None)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--limit", type=int, default=0, help="images per folder (0: all)")
    a = p.parse_args()
    net = load_model(model=a.model if a.weights is None else None, weights=a.weights, scale=a.scale, mode="dynamic")
    all_g, all_b = [], []
    for d in a.data:
        gs, bs = [], []
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in (".png", ".jpg", ".bmp"))
        for f in files[: a.limit or None]:
            hr = cv2.imread(str(f), cv2.IMREAD_COLOR)[:, :, ::-1]
            h, w = hr.shape[0] // a.scale * a.scale, hr.shape[1] // a.scale * a.scale
            lr = imresize(np.ascontiguousarray(hr[:h, :w]), 1 / a.scale).astype(np.float32)
            _, rep = upscale_array(net, lr, TilingConfig("paper"))
            x = torch.from_numpy(lr).permute(2, 0, 1)[None] / 255.0
            for r in rep.regions:
                x0, y0, x1, y1 = r.box
                g = grad_feature(x[:, :, y0:y1, x0:x1])[0, :, 0, 0].sum().item()
                gs.append(g)
                bs.append(r.fab)
        print(f"{d.name}: {len(gs)} regions, Spearman(gradient, FAB) = {spearman(np.array(gs), np.array(bs)):.3f}")  # noqa: T201
        all_g += gs
        all_b += bs
    print(f"all: {len(all_g)} regions, Spearman = {spearman(np.array(all_g), np.array(all_b)):.3f}")  # noqa: T201


if __name__ == "__main__":
    main()
