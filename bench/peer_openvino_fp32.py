"""Peer for bench/peers.py: a plain FP32 network (EDSR-baseline or CARN) on OpenVINO, as a user would run it.

Read PNG, build the FP32 graph of the same weights (no quantizers, no tiling), compile it with
``INFERENCE_PRECISION_HINT=f32``, one inference, write PNG. No PyTorch.
Usage: python bench/peer_openvino_fp32.py WEIGHTS.safetensors IN.png OUT.png [--threads N] [--png-level L]
       [--scale S]
(the PNG at Pillow's default zlib level 6 unless --png-level says otherwise; --scale picks the upsampler of a
multi-scale CARN file)
"""
from __future__ import annotations

import argparse

import numpy as np
import openvino as ov
from PIL import Image

from cadyq_cli.runtime.engine import read_weights
from cadyq_cli.runtime.ov_graph import build_network

p = argparse.ArgumentParser()
p.add_argument("weights")
p.add_argument("inp")
p.add_argument("out")
p.add_argument("--threads", type=int, default=0)
p.add_argument("--png-level", type=int, default=6, help="zlib level of the PNG (6: Pillow's default)")
p.add_argument("--scale", type=int, default=None, help="a CARN file's scale (default: the file's own)")
a = p.parse_args()
x = np.asarray(Image.open(a.inp).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None]
wts = read_weights(a.weights, a.scale)
config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
if a.threads:
    config["INFERENCE_NUM_THREADS"] = a.threads
model = build_network(wts)
model.reshape({"x": list(x.shape)})  # static shapes, as an export for this image size: OpenVINO's fastest
cm = ov.Core().compile_model(model, "CPU", config)
y = cm.create_infer_request().infer([x])[cm.output("sr")]
Image.fromarray(np.rint(np.clip(y[0], 0, 255)).astype(np.uint8).transpose(1, 2, 0)).save(a.out, compress_level=a.png_level)
