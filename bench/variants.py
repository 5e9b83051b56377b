"""Model variants on the same weights, on a run's held-out images: the activation grid
(signed vs relu-unsigned) or, with ``--skip``, EDSR's residual skip (official vs fp).

Runs one model (a shipped one or a checkpoint) on the held-out validation images of the
training folders (a checkpoint's own split; the recipes' for a shipped file; never a benchmark set) in
w8a8, w8a4 and dynamic mode (dynamic as `cadyq eval --tiling paper`), once per variant with
the weights and clips unchanged, and prints PSNR (Y, shave = scale) and FAB. With
``--per-layer`` it also prints what putting a single selector at 4 bits costs (w8a8 elsewhere).

Usage: python bench/variants.py SCALE [--weights W] [--skip] [--data-root ../shared/data/train] [--per-layer]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cadyq_cli.quant.modes import MODES
from cadyq_cli.quant.modules import set_quant_mode
from cadyq_cli.train.validate import _val_run
from cadyq_cli.weights import load_model
from _model_args import run_split, validation_pairs


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scale", type=int)
    ap.add_argument("--weights", help="checkpoint (default: the shipped edsr-baseline of this scale)")
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data/train"))
    ap.add_argument("--skip", action="store_true", help="compare the residual skips instead of the grids")
    ap.add_argument("--per-layer", action="store_true", help="also: each selector alone at 4 bits")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    val = validation_pairs(a.data_root, a.scale, a.threads, run_split(a.weights))
    model = load_model(None if a.weights else "edsr-baseline", weights=a.weights, scale=a.scale, mode="w8a8",
                       kernels="float")
    if a.skip and "fp" not in model.skips:
        raise SystemExit(f"--skip: {model.arch} offers no fp skip (only {', '.join(model.skips)})")
    own = model.act_grid, model.skip
    print(f"weights: {a.weights or f'edsr-baseline-x{a.scale}'} (trained with grid {own[0]}, skip {own[1]}), "
          f"{len(val.hr)} held-out images")
    variants = [(own[0], s) for s in ("official", "fp")] if a.skip else [(g, own[1]) for g in ("signed", "relu-unsigned")]
    print(f"{'mode':8} {'grid':14} {'skip':9} {'PSNR':>8} {'FAB':>5}")
    for mode in ("w8a8", "w8a4", "dynamic"):
        for grid, skip in variants:
            model.set_act_grid(grid)
            model.set_skip(skip)
            set_quant_mode(model, mode)
            psnr, fabs = _val_run(model, val, False, mode == "dynamic")
            fab = sum(fabs) / len(fabs) if fabs else float("nan")
            print(f"{mode:8} {grid:14} {skip:9} {psnr:8.3f} {fab:5.2f}", flush=True)
    model.set_act_grid(own[0])
    model.set_skip(own[1])
    if a.per_layer:
        names = {id(m): n for n, m in model.named_modules()}
        set_quant_mode(model, "w8a8")
        base, _ = _val_run(model, val, False, False)
        print(f"one selector at 4 bits (w8a8 elsewhere, grid {own[0]}, skip {own[1]}; w8a8 {base:.3f} dB):")
        for sel in model.selectors:
            sel.mode = MODES["w8a4"]
            p, _ = _val_run(model, val, False, False)
            sel.mode = MODES["w8a8"]
            print(f"  {names[id(sel)]:22} {'unsigned' if not sel.signed else 'signed':8} {p - base:+.3f} dB", flush=True)


if __name__ == "__main__":
    main()
