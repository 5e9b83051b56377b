"""The FAB probe of the pick rules: a model's mean FAB over the images of non-benchmark folders.

    python bench/fab_probe.py ../shared/data/train/T91 ../shared/data/train/BSD200 ../shared/data/train/BSDS500test \
        [--model edsr-baseline-x4 | --weights FILE --arch edsr] [--scale 4] [--bit-bias 0] [--threads 2]

Each HR image is made into LR as `cadyq eval` does (cropped to a multiple of the scale, MATLAB bicubic) and run
in dynamic mode with the paper tiling, bits only (the upsampling tail does not change the bits). Prints the FAB
per folder (as `cadyq eval --modes dynamic` reports it: the mean of its images) and over every image: the number
recipes/logs/PICK_RULES.md compares. FAB needs no ground truth, so training images serve; never benchmarks.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cadyq_cli.engine import TilingConfig, upscale_array
from cadyq_cli.evaluate import _read_rgb_uint8, list_images
from cadyq_cli.resize import imresize
from _model_args import add_model_args, load_dynamic


def main() -> None:
    """Print the probe FAB per folder and pooled."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="+")
    add_model_args(p, threads=2)
    p.add_argument("--bit-bias", type=float, default=0.0)
    a = p.parse_args()
    model = load_dynamic(a)
    model.set_bit_bias(a.bit_bias)
    cfg = TilingConfig(tiling="paper")
    every: list[float] = []
    for folder in a.folders:
        fabs = []
        for path in list_images(folder):
            hr = _read_rgb_uint8(path)
            hr = hr[: hr.shape[0] // a.scale * a.scale, : hr.shape[1] // a.scale * a.scale]
            lr = imresize(hr, 1 / a.scale).astype(np.float32)
            fabs.append(float(upscale_array(model, lr, cfg, bits_only=True)[1].fab))
        every += fabs
        print(f"  {folder.name:14s} {len(fabs):4d} images  FAB {np.mean(fabs):.4f}")
    print(f"probe FAB over {len(every)} images: {np.mean(every):.4f}")


if __name__ == "__main__":
    main()
