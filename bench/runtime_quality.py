"""Quality of the OpenVINO runtime (the default `cadyq upscale` path) against the PyTorch reference.

    python bench/runtime_quality.py ../shared/data/benchmark/Set5 [more sets] [--scale 4] [--limit N]

For each HR image: LR by MATLAB bicubic (as `cadyq eval`), then x`scale` by the shipped
EDSR-baseline model in dynamic mode, seamless tiling (what `cadyq upscale` runs), through
(a) the PyTorch engine with the float kernels (the reference), (b) the OpenVINO runtime with the
FP32 tail (the default), (c) the OpenVINO runtime with `--fp-layers bf16`. Prints the mean PSNR and
SSIM (Y, border shave = scale) and FAB of each per set, and the differences to (a).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cadyq_cli.engine import upscale_array  # noqa: E402
from cadyq_cli.evaluate import list_images  # noqa: E402
from cadyq_cli.io import read_image  # noqa: E402
from cadyq_cli.metrics import psnr_y, ssim_y  # noqa: E402
from cadyq_cli.quant.intconv import set_kernels  # noqa: E402
from cadyq_cli.resize import imresize  # noqa: E402
from cadyq_cli.runtime.engine import load_openvino_model  # noqa: E402
from cadyq_cli.weights import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sets", nargs="+", type=Path)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    ref = load_model(scale=a.scale)
    set_kernels(ref, "float")
    engines = {
        "pytorch_float": lambda x: upscale_array(ref, x),
        "openvino_fp32": load_openvino_model(scale=a.scale, threads=a.threads).upscale_array,
        "openvino_bf16": load_openvino_model(scale=a.scale, threads=a.threads, fp_layers="bf16").upscale_array,
    }
    print(f"edsr-baseline-x{a.scale}, dynamic, seamless tiling; PSNR/SSIM on Y, shave {a.scale}")
    for folder in a.sets:
        rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in engines}
        for path in list_images(folder)[: a.limit or None]:
            hr = np.clip(np.rint(read_image(path).rgb), 0, 255).astype(np.uint8)
            h, w = (hr.shape[0] // a.scale) * a.scale, (hr.shape[1] // a.scale) * a.scale
            hr = hr[:h, :w]
            lr = imresize(hr, 1 / a.scale).astype(np.float32)
            for name, run in engines.items():
                out, rep = run(lr)
                sr = np.clip(np.rint(out), 0, 255).astype(np.uint8)
                rows[name].append((psnr_y(sr, hr, a.scale), ssim_y(sr, hr, a.scale), float(rep.fab)))
        base = np.mean(rows["pytorch_float"], axis=0)
        print(f"{folder.name} ({len(rows['pytorch_float'])} images)")
        for name, vals in rows.items():
            m = np.mean(vals, axis=0)
            print(f"  {name:14s} PSNR {m[0]:.3f} ({m[0] - base[0]:+.3f})  SSIM {m[1]:.4f} ({m[1] - base[1]:+.4f})  "
                  f"FAB {m[2]:.2f}")


if __name__ == "__main__":
    main()
