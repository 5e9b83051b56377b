"""Baseline for bench_upscale.py: a plain FP32 PyTorch forward of EDSR-baseline on a whole image.

No tiling, no quantization code on the path: read PNG, one forward, write PNG.
Usage: python bench/plain_fp32.py WEIGHTS IN.png OUT.png [--threads N]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from cadyq_cli.checkpoint import load_model_file
from cadyq_cli.quant import set_quant_mode

p = argparse.ArgumentParser()
p.add_argument("weights")
p.add_argument("inp")
p.add_argument("out")
p.add_argument("--threads", type=int, default=0)
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
model = load_model_file(a.weights)
set_quant_mode(model, "fp32")
x = torch.from_numpy(np.asarray(Image.open(a.inp).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
with torch.inference_mode():
    y, _ = model(x)
Image.fromarray(y[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy()).save(a.out)
