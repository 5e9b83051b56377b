"""``--target-fab``: the FAB each image lands on, the probes it took, and its cost against a plain upscale.

For every image of a dataset folder (HR; LR made by MATLAB bicubic as in ``cadyq eval``), fits the
bit bias to the target with :func:`cadyq_cli.dial.upscale_to_fab` and times it beside a plain
dynamic upscale of the same LR image, interleaved (medians of ``--reps``).

Usage: python bench/dial_target.py DATASET_DIR [--scale 4] [--target 5.0] [--reps 1] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._timing import interleaved  # noqa: E402
from cadyq_cli.dial import upscale_to_fab  # noqa: E402
from cadyq_cli.engine import TilingConfig, upscale_array  # noqa: E402
from cadyq_cli.evaluate import _read_rgb_uint8, list_images  # noqa: E402
from cadyq_cli.resize import imresize  # noqa: E402
from cadyq_cli.weights import load_model  # noqa: E402


def main() -> None:
    """Print one row per image and the worst distance to the target."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--target", type=float, default=5.0)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiling", default="seamless")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model("edsr-baseline", scale=a.scale, mode="dynamic")
    cfg = TilingConfig(tiling=a.tiling)
    worst = 0.0
    print(f"{'image':<16} {'FAB@0':>6} {'FAB':>6} {'bias':>8} {'probes':>6} {'time/plain':>10}")
    for path in list_images(Path(a.data)):
        hr = _read_rgb_uint8(path)
        h, w = (hr.shape[0] // a.scale) * a.scale, (hr.shape[1] // a.scale) * a.scale
        lr = imresize(hr[:h, :w], 1 / a.scale).astype(np.float32)
        res: dict = {}
        variants = {
            "plain": lambda: res.__setitem__("plain", upscale_array(model, lr, cfg)[1]),
            "target": lambda: res.__setitem__("target", upscale_to_fab(model, lr, cfg, a.target)[1]),
        }
        _, med = interleaved(variants, a.reps)
        t = res["target"]
        worst = max(worst, abs(t.fab - a.target))
        print(f"{path.name:<16} {res['plain'].fab:6.2f} {t.fab:6.2f} {t.bit_bias:8.3f} {t.probes:6d} "
              f"{med['target'] / med['plain']:10.2f}")
    print(f"worst |FAB - {a.target}| = {worst:.3f}")


if __name__ == "__main__":
    main()
