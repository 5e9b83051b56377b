"""Where does 4-bit quantization lose? The activation statistics behind each selector, and w8a4 with clips re-fit.

For a model (default the shipped edsr-baseline-x4) and images of the training folders (never a benchmark):
per selector input, the fraction of negative values, the 0.1 / 99.9 % quantiles and the largest |x| against
the 4-bit clip; then w8a4 PSNR (Y, shave = scale) on held-apart images with the shipped clips and with every
4-bit clip replaced by the one that minimizes the quantization MSE on the calibration images
(`cadyq_cli.train.calibrate.mse_clip`). A clip far from its MSE optimum, or a skewed signed input, would say
the quantizer's bounds are what to improve; neither says the grid itself is (per-tensor, uniform).

Usage: python bench/act_quantizer.py [--model edsr-baseline-x4] [--data ../shared/data/train/BSD200]
       [--calib 8] [--test 10] [--threads 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cadyq_cli.metrics import psnr_y
from cadyq_cli.quant.modules import BitSelector, set_quant_mode
from cadyq_cli.resize import imresize
from cadyq_cli.train.calibrate import mse_clip
from cadyq_cli.weights import load_model


def _pair(path: Path, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR float32, HR uint8) with MATLAB bicubic, as `cadyq eval` makes them."""
    hr = np.asarray(Image.open(path).convert("RGB"))
    hr = hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale]
    lr = np.clip(np.round(imresize(hr.astype(np.float64), 1 / scale)), 0, 255).astype(np.float32)
    return lr, hr


def _run(model: torch.nn.Module, lr: np.ndarray) -> np.ndarray:
    out = model(torch.from_numpy(lr).permute(2, 0, 1)[None])
    out = out[0] if isinstance(out, tuple) else out
    return out[0].permute(1, 2, 0).clamp(0, 255).round().numpy()


def main() -> None:
    """Print the statistics and the two w8a4 PSNRs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="edsr-baseline-x4")
    p.add_argument("--data", type=Path, default=Path("../shared/data/train/BSD200"))
    p.add_argument("--calib", type=int, default=8, help="images whose activations fit the clips")
    p.add_argument("--test", type=int, default=10, help="other images the w8a4 PSNR is measured on")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    files = sorted(f for f in a.data.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    calib, test = files[: a.calib], files[len(files) // 2 : len(files) // 2 + a.test]
    model = load_model(a.model, mode="fp32", kernels="float")
    model.eval()
    sels = [m for m in model.modules() if isinstance(m, BitSelector)]
    acts: dict[int, list[torch.Tensor]] = {id(s): [] for s in sels}
    hooks = [s.register_forward_pre_hook(lambda mod, inp: acts[id(mod)].append(inp[0].detach().flatten()[::13].clone()))
             for s in sels]
    with torch.no_grad():
        for f in calib:
            _run(model, _pair(f, model.scale)[0])
    for h in hooks:
        h.remove()
    print(f"{a.model}: {len(calib)} calibration / {len(test)} test images of {a.data}")
    print("selector  grid      neg    q0.1%    q99.9%   max|x|  alpha4  mse-alpha4")
    fitted = []
    for i, s in enumerate(sels):
        x = torch.cat(acts[id(s)])
        q = torch.quantile(x[:: max(1, x.numel() // 200_000)], torch.tensor([0.001, 0.999]))
        alpha = float(s.quant_bit1.alpha.detach())
        best = mse_clip(x, 4, signed=s.signed)
        fitted.append(best)
        grid = "signed" if s.signed else "unsigned"
        print(f"{i:8d}  {grid:8s} {float((x < 0).float().mean()):5.2f} {float(q[0]):8.2f} {float(q[1]):8.2f} "
              f"{float(x.abs().max()):8.2f} {alpha:7.2f} {best:10.2f}")

    def w8a4_psnr() -> float:
        set_quant_mode(model, "w8a4")
        with torch.no_grad():
            return float(np.mean([psnr_y(_run(model, lr), hr.astype(np.float32), model.scale)
                                  for lr, hr in (_pair(f, model.scale) for f in test)]))

    shipped = w8a4_psnr()
    with torch.no_grad():
        for s, best in zip(sels, fitted):
            s.quant_bit1.alpha.fill_(best)
    print(f"w8a4 PSNR: shipped clips {shipped:.4f} dB, MSE-fitted 4-bit clips {w8a4_psnr():.4f} dB")


if __name__ == "__main__":
    main()
