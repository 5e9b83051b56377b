"""Training data: HR folders (and, with scale augmentation, their downscaled copies), MATLAB-bicubic LR, random
crops with flips and 90° rotations."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..io import INPUT_EXTENSIONS
from ..resize import imresize

__all__ = ["SRPairs", "read_images", "make_pairs", "load_pairs", "list_images", "split_train_val", "split_pairs",
           "split_pairs_at", "heldout_pairs", "data_fingerprint"]


@dataclass
class SRPairs:
    """HR images (uint8 RGB, cropped to a multiple of scale) and their LR versions."""

    names: list[str]
    hr: list[np.ndarray]
    lr: list[np.ndarray]
    scale: int

    def sample(self, rng: np.random.Generator, batch: int, lr_patch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch: LR (B, 3, p, p) and HR (B, 3, sp, sp) float32 on 0..255."""
        s = self.scale
        lrs, hrs = [], []
        for _ in range(batch):
            i = int(rng.integers(len(self.lr)))
            lr, hr = self.lr[i], self.hr[i]
            h, w = lr.shape[:2]
            y = int(rng.integers(0, h - lr_patch + 1))
            x = int(rng.integers(0, w - lr_patch + 1))
            a = lr[y : y + lr_patch, x : x + lr_patch]
            b = hr[y * s : (y + lr_patch) * s, x * s : (x + lr_patch) * s]
            k = int(rng.integers(8))
            if k & 1:
                a, b = a[:, ::-1], b[:, ::-1]
            if k & 2:
                a, b = a[::-1], b[::-1]
            if k & 4:
                a, b = a.transpose(1, 0, 2), b.transpose(1, 0, 2)
            lrs.append(np.ascontiguousarray(a))
            hrs.append(np.ascontiguousarray(b))
        to_t = lambda xs: torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float()  # noqa: E731
        return to_t(lrs), to_t(hrs)


def list_images(roots: list[Path]) -> list[Path]:
    """All image files below ``roots``, sorted."""
    out: list[Path] = []
    for r in roots:
        out += [p for p in sorted(Path(r).rglob("*")) if p.suffix.lower() in INPUT_EXTENSIONS]
    return out


def data_fingerprint(roots: list[Path]) -> str:
    """sha256 (16 hex digits) of the image list below ``roots``: each file as ``<root folder
    name>/<relative path>:<size in bytes>`` (names and sizes, not pixels: cheap, and enough to tell
    whether two machines train on the same images, whatever their paths)."""
    h = hashlib.sha256()
    for r in roots:
        r = Path(r).resolve()
        for p in list_images([r]):
            h.update(f"{r.name}/{p.relative_to(r).as_posix()}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def read_images(paths: list[Path], scale_aug: tuple[float, ...] = ()) -> list[tuple[str, np.ndarray]]:
    """The images ``paths`` as (name, uint8 RGB) (unreadable ones skipped), each followed by its copies downscaled
    (MATLAB bicubic) by the factors ``scale_aug``, named ``<name>@<factor>``."""
    out = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            continue
        full = np.ascontiguousarray(img[:, :, ::-1])
        out.append((p.name, full))
        out += [(f"{p.name}@{f:g}", imresize(full, f)) for f in scale_aug]
    return out


def make_pairs(images: list[tuple[str, np.ndarray]], scale: int, min_lr: int) -> SRPairs:
    """HR/LR pairs of ``images`` (from :func:`read_images`): each cropped to a multiple of ``scale``, its LR made with
    MATLAB bicubic; an image with fewer than ``min_lr`` LR pixels a side is left out."""
    names, hrs, lrs = [], [], []
    for name, img in images:
        h, w = (img.shape[0] // scale) * scale, (img.shape[1] // scale) * scale
        if min(h, w) // scale < min_lr:
            continue
        hr = np.ascontiguousarray(img[:h, :w])
        names.append(name)
        hrs.append(hr)
        lrs.append(imresize(hr, 1 / scale))
    return SRPairs(names, hrs, lrs, scale)


def load_pairs(paths: list[Path], scale: int, min_lr: int = 48, scale_aug: tuple[float, ...] = ()) -> SRPairs:
    """Read HR images, crop to a multiple of ``scale``, make LR with MATLAB bicubic.

    ``scale_aug``: also each image downscaled (MATLAB bicubic) by these factors, as further HR images
    (named ``<name>@<factor>``), each where one crop still fits."""
    return make_pairs(read_images(paths, scale_aug), scale, min_lr)


VAL_MIN_LR = 8  # held-out images are validated whole: any image with at least 8 LR pixels a side


def split_pairs_at(paths: list[Path], n_val: int, seed: int, scales: list[int], lr_patch: int | None,
                   scale_aug: tuple[float, ...] = ()) -> dict[int, tuple[SRPairs | None, SRPairs]]:
    """:func:`split_pairs` at each of ``scales`` (a multi-scale run), every image (and copy) read and made once."""
    train_paths, val_paths = split_train_val(paths, n_val, seed)
    val = read_images(val_paths)
    train = read_images(train_paths, scale_aug) if lr_patch is not None else []
    return {s: (None if lr_patch is None else make_pairs(train, s, lr_patch), make_pairs(val, s, VAL_MIN_LR))
            for s in scales}


def split_pairs(paths: list[Path], n_val: int, seed: int, scale: int,
                lr_patch: int | None, scale_aug: tuple[float, ...] = ()) -> tuple[SRPairs | None, SRPairs]:
    """The training pairs and the held-out validation pairs of the images ``paths``.

    Training keeps images with at least ``lr_patch`` LR pixels a side (one crop fits); with
    ``lr_patch=None`` only the held-out pairs are read (the first item is ``None``). ``scale_aug``: the
    training images' downscaled copies too (:func:`load_pairs`); the held-out images stay as they are.
    """
    return split_pairs_at(paths, n_val, seed, [scale], lr_patch, scale_aug)[scale]


def heldout_pairs(roots: list[Path], n_val: int, seed: int, scale: int) -> SRPairs:
    """The validation images of a run (its held-out split of the images below ``roots``)."""
    return split_pairs(list_images(roots), n_val, seed, scale, None)[1]


def split_train_val(paths: list[Path], n_val: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """A fixed held-out split of the training images (never a benchmark set)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    val = [paths[i] for i in sorted(order[:n_val])]
    train = [paths[i] for i in sorted(order[n_val:])]
    return train, val
