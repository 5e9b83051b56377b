"""Shared command-line options of the benchmarks that run one model in dynamic mode, and the held-out
validation images the validation benchmarks run on."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cadyq_cli.models._base import SRModel
from cadyq_cli.train.data import SRPairs, heldout_pairs
from cadyq_cli.weights import load_model


def add_model_args(p: argparse.ArgumentParser, threads: int) -> None:
    """``--model`` (a shipped name) or ``--weights FILE --arch A``, ``--scale``, ``--threads``."""
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--arch", default=None)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--threads", type=int, default=threads)


def load_dynamic(a: argparse.Namespace) -> SRModel:
    """The model the options name, in dynamic mode, with torch on ``--threads`` threads."""
    torch.set_num_threads(a.threads)
    return load_model(a.model, weights=a.weights, arch=a.arch, scale=a.scale, mode="dynamic")


def validation_pairs(data_root: Path, scale: int, threads: int = 0) -> SRPairs:
    """The 10 held-out validation images of the training folders under ``data_root`` (the split every
    `cadyq train` run validates on with the recipes' defaults: seed 0, 10 images; never a benchmark set), with torch on ``threads`` threads (0: its
    default) and gradients off."""
    roots = [data_root / d for d in ("T91", "BSD200", "BSDS500test")]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:  # another image list would give another split: not the runs' held-out images
        raise SystemExit(f"no training folder {missing[0]} (give --data-root, the folder holding T91, BSD200 and BSDS500test)")
    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    return heldout_pairs(roots, 10, 0, scale)
