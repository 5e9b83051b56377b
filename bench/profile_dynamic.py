"""Where a dynamic `upscale_array` spends its time: torch.profiler table, shipped EDSR-baseline x4.

Usage: python bench/profile_dynamic.py [--size 320x240] [--threads 2] [--rows 16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cadyq_cli.engine import upscale_array  # noqa: E402
from cadyq_cli.weights import load_model  # noqa: E402


def main() -> None:
    """Profile one dynamic upscale of a generated image (after a small warm-up) and print the top ops."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="320x240")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    w, h = map(int, a.size.lower().split("x"))
    model = load_model("edsr-baseline", scale=4, mode="dynamic")
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).normal(0, 12, (h, w)) * (xx > w // 2)
    img = np.clip(128 + 60 * np.sin(xx / 17) * np.cos(yy / 23) + noise, 0, 255)
    rgb = np.repeat(img[:, :, None], 3, 2).astype(np.float32)
    upscale_array(model, rgb[:64, :64])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        upscale_array(model, rgb)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
