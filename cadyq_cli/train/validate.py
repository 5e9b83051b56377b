"""Validation during training: PSNR (Y) and FAB on the run's held-out images, measured as the
benchmarks measure them."""
from __future__ import annotations

import numpy as np
import torch

from ..engine import TilingConfig, upscale_array
from ..metrics import psnr_y
from ..models._base import SRModel
from ..quant.modules import set_quant_mode
from .data import SRPairs

__all__ = ["validate"]


def _val_run(model: SRModel, val: SRPairs, bf16: bool, tiled: bool) -> tuple[float, list[float]]:
    """Mean PSNR over the held-out images and each image's FAB (empty when unquantized).

    ``tiled``: run the images as ``cadyq eval --tiling paper`` does (96 px LR patches, bits per
    patch), so that validation numbers predict benchmark ones; otherwise one whole-image forward.
    """
    psnrs, fabs = [], []
    dev = next(model.parameters()).device
    for lr, hr in zip(val.lr, val.hr):
        if tiled:
            sr, report = upscale_array(model, lr.astype(np.float32), TilingConfig(tiling="paper"))
            out = np.round(sr)
            fab = float(report.fab) if model.mode.quantized else None
        else:
            x = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].float().to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                y, bits = model(x)
            out = y.float().clamp(0, 255).round()[0].permute(1, 2, 0).cpu().numpy()
            fab = float(bits.mean()) if bits.numel() else None
        psnrs.append(psnr_y(out, hr, val.scale))
        if fab is not None:
            fabs.append(fab)
    return float(np.mean(psnrs)), fabs


@torch.no_grad()
def validate(model: SRModel, val: SRPairs, bf16: bool) -> dict[str, float]:
    """Mean PSNR (Y, shave = scale) and FAB on the held-out images.

    fp32 and w8a8 models run each image whole. A model in ``dynamic`` mode runs as
    ``cadyq eval --tiling paper`` does (bits chosen per 96 px patch: what the benchmarks
    measure), and again in ``w8a8`` with the same weights: ``val_psnr_w8a8`` is the reference its
    quality loss is judged against, on images it was not trained on.
    """
    was_training = model.training
    model.eval()
    mode = model.mode
    tiled = mode.name == "dynamic"
    try:
        psnr, fabs = _val_run(model, val, bf16, tiled)
        rec = {"val_psnr": psnr, "val_fab": float(np.mean(fabs)) if fabs else 32.0}
        if tiled:
            set_quant_mode(model, "w8a8")
            rec["val_psnr_w8a8"] = _val_run(model, val, bf16, tiled)[0]
    finally:
        set_quant_mode(model, mode)
        model.train(was_training)
    return rec
