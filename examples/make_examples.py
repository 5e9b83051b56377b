"""Generate the example images shipped in examples/ (deterministic; no third-party content).

Run: python examples/make_examples.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).parent


def scene(w: int = 192, h: int = 144, seed: int = 0) -> Image.Image:
    """Flat sky, smooth hills, a textured field, a house with fine lines, text."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h)[:, None, None]
    sky = (np.array([120, 170, 230]) * (1 - y) + np.array([200, 225, 250]) * y) * np.ones((1, w, 1))
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse((-40, 70, 120, 200), fill=(90, 150, 80))
    d.ellipse((80, 80, 260, 220), fill=(70, 130, 60))
    field = rng.integers(0, 60, (h - 110, w, 1)) + np.array([[[80, 120, 40]]])
    img.paste(Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)), (0, 110))
    d.rectangle((120, 60, 170, 105), fill=(190, 80, 60), outline=(40, 20, 20))
    d.polygon([(115, 60), (145, 35), (175, 60)], fill=(120, 60, 50))
    for x in range(124, 168, 3):
        d.line((x, 64, x, 80), fill=(240, 230, 210))
    d.rectangle((138, 85, 152, 105), fill=(60, 40, 30))
    d.text((8, 8), "cadyq x4", fill=(255, 255, 255))
    d.ellipse((20, 25, 44, 49), fill=(255, 230, 120))
    return img


def texture(w: int = 160, h: int = 120, seed: int = 1) -> Image.Image:
    """Left half flat, right half detailed: the bit selector should tell them apart."""
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), np.float64) + np.array([140, 140, 150])
    xx, yy = np.meshgrid(np.arange(w), np.arange(h))
    stripes = 127 + 100 * np.sin(xx * 0.9 + yy * 0.35)
    noise = rng.normal(0, 25, (h, w))
    right = np.clip(stripes + noise, 0, 255)
    a[:, w // 2 :, :] = right[:, w // 2 :, None] * np.array([1.0, 0.9, 0.8])
    return Image.fromarray(a.astype(np.uint8))


def logo_rgba(w: int = 96, h: int = 96) -> Image.Image:
    """A transparent logo (RGBA) to show alpha handling."""
    img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.ellipse((6, 6, w - 6, h - 6), fill=(30, 90, 200, 255), outline=(255, 255, 255, 255), width=3)
    d.text((w // 2 - 14, h // 2 - 6), "SR", fill=(255, 255, 255, 255))
    return img.filter(ImageFilter.SMOOTH)


if __name__ == "__main__":
    scene().save(HERE / "scene.png")
    texture().save(HERE / "flat_vs_texture.png")
    logo_rgba().save(HERE / "logo_rgba.png")
