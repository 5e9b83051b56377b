"""Where does 4-bit quantization lose? The activation statistics behind each selector, and w8a4 with clips re-fit.

For a model (default the shipped edsr-baseline-x4) and images of the training folders (never a benchmark):
per selector input, the fraction of negative values, the 0.1 / 99.9 % quantiles and the largest |x| against
the 4-bit clip; then w8a4 PSNR on held-apart images (`cadyq eval`'s protocol and code, paper tiling) with the
shipped clips and with every 4-bit clip replaced by the one that minimizes the quantization MSE on the
calibration images (`cadyq_cli.train.calibrate.mse_clip`). A clip far from its MSE optimum, or a skewed signed input, would say
the quantizer's bounds are what to improve; neither says the grid itself is (per-tensor, uniform).
``--per-channel`` adds a third w8a4 PSNR with one MSE-fitted 4-bit clip per input channel (a per-channel
activation grid without training; its weight-side cost, the clips folded into the 8-bit weights, not
counted): whether a finer grid, fitted as the calibration fits clips, gains anything before one trains it.

Usage: python bench/act_quantizer.py [--model edsr-baseline-x4] [--data ../shared/data/train/BSD200]
       [--test-data ../shared/data/train/T91] [--calib 8] [--test 10] [--threads 2] [--per-channel]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cadyq_cli.engine import TilingConfig, upscale_array
from cadyq_cli.evaluate import _read_rgb_uint8, evaluate, list_images
from cadyq_cli.quant.modules import BitSelector
from cadyq_cli.resize import imresize
from cadyq_cli.train.calibrate import mse_clip
from cadyq_cli.weights import load_model


def main() -> None:
    """Print the statistics and the two w8a4 PSNRs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="edsr-baseline-x4")
    p.add_argument("--data", type=Path, default=Path("../shared/data/train/BSD200"), help="calibration images")
    p.add_argument("--test-data", type=Path, default=Path("../shared/data/train/T91"), help="w8a4 PSNR images")
    p.add_argument("--calib", type=int, default=8, help="images (the first, by name) whose activations fit the clips")
    p.add_argument("--test", type=int, default=10, help="images (the first, by name) the w8a4 PSNR is measured on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-channel", action="store_true", help="also w8a4 with one fitted 4-bit clip per channel")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model, mode="fp32", kernels="float")
    s = model.scale
    sels = [m for m in model.modules() if isinstance(m, BitSelector)]
    acts: dict[int, list[torch.Tensor]] = {id(m): [] for m in sels}
    hooks = [m.register_forward_pre_hook(  # every 13th value of each channel: (C, n)
        lambda mod, inp: acts[id(mod)].append(inp[0].detach().transpose(0, 1).flatten(1)[:, ::13].clone()))
        for m in sels]
    for path in list_images(a.data)[: a.calib]:  # LR as `cadyq eval` makes it
        hr = _read_rgb_uint8(path)
        upscale_array(model, imresize(hr[: hr.shape[0] // s * s, : hr.shape[1] // s * s], 1 / s).astype(np.float32),
                      TilingConfig(tiling="paper"))
    for h in hooks:
        h.remove()
    print(f"{a.model}: clips fit on the first {a.calib} images of {a.data}, w8a4 on the first {a.test} of {a.test_data}")
    print("selector  grid      neg    q0.1%    q99.9%   max|x|  alpha4  mse-alpha4")
    fitted = []
    for i, sel in enumerate(sels):
        xc = torch.cat(acts[id(sel)], dim=1)
        x = xc.flatten()
        q = torch.quantile(x[:: max(1, x.numel() // 200_000)], torch.tensor([0.001, 0.999]))
        alpha = float(sel.quant_bit1.alpha.detach())
        best = mse_clip(x, 4, signed=sel.signed)
        fitted.append((best, [mse_clip(c, 4, signed=sel.signed) for c in xc] if a.per_channel else None))
        grid = "signed" if sel.signed else "unsigned"
        print(f"{i:8d}  {grid:8s} {float((x < 0).float().mean()):5.2f} {float(q[0]):8.2f} {float(q[1]):8.2f} "
              f"{float(x.abs().max()):8.2f} {alpha:7.2f} {best:10.2f}")

    def w8a4_psnr() -> float:
        return evaluate([a.test_data], s, model, ["w8a4"], bicubic=False, limit=a.test).results[0].psnr

    shipped = w8a4_psnr()
    with torch.no_grad():
        for sel, (best, _) in zip(sels, fitted):
            sel.quant_bit1.alpha.fill_(best)
    print(f"w8a4 PSNR: shipped clips {shipped:.4f} dB, MSE-fitted 4-bit clips {w8a4_psnr():.4f} dB")
    if a.per_channel:  # the float (fake-quantization) path broadcasts a (1, C, 1, 1) clip
        for sel, (_, per) in zip(sels, fitted):
            sel.quant_bit1.alpha.data = torch.tensor(per).reshape(1, -1, 1, 1)
        print(f"w8a4 PSNR: one MSE-fitted 4-bit clip per channel {w8a4_psnr():.4f} dB (weight fold not counted)")


if __name__ == "__main__":
    main()
