"""PSNR and SSIM on the Y channel, the SR benchmark convention.

* Y = (65.738 R + 129.057 G + 25.064 B) / 256 + 16 for PSNR (ITU-R BT.601, 16..235), on
  images of 0..255 values; SSIM uses /255 as the usual MATLAB code does (spec §10).
* A border of ``shave`` pixels (the scale) is ignored on each side.
* SSIM: Gaussian window 11, sigma 1.5, ``cv2.filter2D`` then the 5-pixel "valid" crop,
  C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, mean of the map.
All arithmetic is float64; inputs are (H, W, 3) RGB arrays of 0..255 values (uint8 or float).
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["rgb_to_y", "psnr_y", "ssim_y"]


def rgb_to_y(img: np.ndarray, divisor: float = 256.0, round_y: bool = False) -> np.ndarray:
    """BT.601 luma of an (H, W, 3) RGB 0..255 image (or pass-through of an (H, W) gray image).

    ``round_y`` rounds Y to integers as MATLAB's ``rgb2ycbcr`` does for uint8 images.
    """
    x = img.astype(np.float64)
    if x.ndim == 2:
        return x
    y = (65.738 * x[..., 0] + 129.057 * x[..., 1] + 25.064 * x[..., 2]) / divisor + 16.0
    return np.floor(y + 0.5) if round_y else y


def _shave(x: np.ndarray, shave: int) -> np.ndarray:
    return x[shave:-shave, shave:-shave] if shave > 0 else x


def psnr_y(sr: np.ndarray, hr: np.ndarray, shave: int, round_y: bool = False) -> float:
    """PSNR in dB on Y between two RGB 0..255 images of equal size, ignoring ``shave`` px borders.

    Identical images give ``inf``. ``round_y``: Y rounded to integers (MATLAB uint8 convention).
    """
    if sr.shape != hr.shape:
        raise ValueError(f"shape mismatch {sr.shape} vs {hr.shape}")
    d = _shave(rgb_to_y(sr, round_y=round_y) - rgb_to_y(hr, round_y=round_y), shave) / 255.0
    mse = float(np.mean(d * d))
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


def ssim_y(sr: np.ndarray, hr: np.ndarray, shave: int, round_y: bool = False) -> float:
    """SSIM on Y (MATLAB-style, see module docstring) ignoring ``shave`` px borders."""
    if sr.shape != hr.shape:
        raise ValueError(f"shape mismatch {sr.shape} vs {hr.shape}")
    a = _shave(rgb_to_y(sr, 255.0, round_y), shave)
    b = _shave(rgb_to_y(hr, 255.0, round_y), shave)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = cv2.getGaussianKernel(11, 1.5)
    win = k @ k.T
    f = lambda z: cv2.filter2D(z, -1, win)[5:-5, 5:-5]  # noqa: E731
    mu1, mu2 = f(a), f(b)
    s11, s22, s12 = f(a * a) - mu1**2, f(b * b) - mu2**2, f(a * b) - mu1 * mu2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return float(m.mean())
