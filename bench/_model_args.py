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


#: the training folders, held-out count and seed of the recipes (the split their runs validate on)
RECIPE_SPLIT = {"data": ["T91", "BSD200", "BSDS500test"], "n_val": 10, "seed": 0}


def run_split(weights: str | None) -> dict:
    """The held-out split a training checkpoint or --wip file ``weights`` validated on (its config's folder
    names, ``n_val`` and ``seed``); the recipes' :data:`RECIPE_SPLIT` for a shipped file, which records none."""
    if not weights:
        return dict(RECIPE_SPLIT)
    from cadyq_cli.train.state import load_state

    cfg = load_state(weights).get("config") or {}
    return {"data": [Path(d).name for d in cfg.get("data") or []] or RECIPE_SPLIT["data"],
            "n_val": int(cfg.get("n_val", RECIPE_SPLIT["n_val"])), "seed": int(cfg.get("seed", RECIPE_SPLIT["seed"]))}


def validation_pairs(data_root: Path, scale: int, threads: int = 0, split: dict | None = None) -> SRPairs:
    """The held-out validation images of the training folders under ``data_root`` (``split``: folder names,
    ``n_val``, ``seed`` as :func:`run_split` gives them; default the recipes', :data:`RECIPE_SPLIT`; never a
    benchmark set), with torch on ``threads`` threads (0: its default) and gradients off."""
    split = split or RECIPE_SPLIT
    roots = [data_root / d for d in split["data"]]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:  # another image list would give another split: not the runs' held-out images
        raise SystemExit(f"no training folder {missing[0]} (give --data-root, the folder holding "
                         f"{', '.join(split['data'])})")
    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    return heldout_pairs(roots, split["n_val"], split["seed"], scale)
