"""Layer floors on the held-out validation images: which selectors, floored at 8 bits, close the most of the
dynamic mode's gap to w8a8 per bit spent.

Runs one model (a shipped EDSR-baseline or a checkpoint) on the held-out validation images of the training
folders (a checkpoint's own split; the recipes' for a shipped file; never a benchmark set) as
`cadyq eval --tiling paper` runs them: w8a8 once and dynamic once; then dynamic with each selector alone
floored at 8 bits (`SRModel.fold_bit_floor`, what `python -m cadyq_cli.train.export --bit-floor` folds into a
file), its PSNR gain and FAB cost; then the selectors floored together in order of gain per bit, k = 1 .. --top.
Prints one row per setting (PSNR difference from w8a8, FAB). With ``--max-fab F`` it names the largest k whose
FAB is at most F and its layers (the --bit-floor list).

Usage: python bench/layer_floors.py SCALE [--weights W] [--top 12] [--max-fab 4.585] [--json]
       [--data-root ../shared/data/train]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cadyq_cli.models._base import SRModel
from cadyq_cli.quant.modules import set_quant_mode
from cadyq_cli.train.data import SRPairs
from cadyq_cli.train.validate import _val_run
from cadyq_cli.weights import load_model
from _model_args import run_split, validation_pairs


def _dynamic(model: SRModel, val: SRPairs, floors: list[str]) -> tuple[float, float]:
    """Validation PSNR and FAB of ``model`` in dynamic mode with ``floors`` floored at 8 bits (the selectors'
    output biases are put back exactly afterwards)."""
    kept = [sel.net_small[0].bias.detach().clone() for sel in model.selectors]
    model.fold_bit_floor(floors)
    try:
        psnr, fabs = _val_run(model, val, False, True)
    finally:
        with torch.no_grad():
            for sel, b in zip(model.selectors, kept):
                sel.net_small[0].bias.copy_(b)
    return psnr, sum(fabs) / len(fabs)


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scale", type=int)
    ap.add_argument("--weights", help="checkpoint (default: the shipped edsr-baseline of this scale)")
    ap.add_argument("--top", type=int, default=12, help="floor the first 1 .. TOP selectors together")
    ap.add_argument("--max-fab", type=float, help="name the largest k whose validation FAB is at most this")
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data/train"))
    ap.add_argument("--json", action="store_true", help="one JSON line per setting instead of the table")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    val = validation_pairs(a.data_root, a.scale, a.threads, run_split(a.weights))
    model = load_model(None if a.weights else "edsr-baseline", weights=a.weights, scale=a.scale, mode="w8a8")
    ref, _ = _val_run(model, val, False, True)
    set_quant_mode(model, "dynamic")
    base, base_fab = _dynamic(model, val, [])

    def show(row: dict) -> None:
        if a.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['what']:9} {row.get('k', ''):>3} {row['layer']:18} {row['gap']:+8.4f} {row['fab']:6.3f}", flush=True)

    if not a.json:
        print(f"weights: {a.weights or f'edsr-baseline-x{a.scale}'}, {len(val.hr)} held-out images, paper tiling; "
              f"w8a8 {ref:.3f} dB")
        print(f"{'setting':9} {'k':>3} {'layer':18} {'vs w8a8':>8} {'FAB':>6}")
    show({"what": "dynamic", "layer": "", "gap": base - ref, "fab": base_fab})
    gain = {}
    for name in model.selector_names():
        psnr, fab = _dynamic(model, val, [name])
        # a floor changes the other selectors' inputs, so it may cost next to no bits (or save some): the cost
        # counts as at least one selector moving by a bit in 8, so such a layer ranks by its PSNR change
        gain[name] = (psnr - base) / max(fab - base_fab, 1 / (8 * len(model.selectors)))
        show({"what": "alone", "layer": name, "gap": psnr - ref, "fab": fab})
    order = sorted(gain, key=lambda n: -gain[n])
    joint = []
    for k in range(1, min(a.top, len(order)) + 1):
        psnr, fab = _dynamic(model, val, order[:k])
        joint.append({"what": "together", "k": k, "layer": order[k - 1], "gap": psnr - ref, "fab": fab})
        show(joint[-1])
    if a.max_fab is not None:
        ok = [r for r in joint if r["fab"] <= a.max_fab]
        k = ok[-1]["k"] if ok else 0
        choice = {"max_fab": a.max_fab, "k": k, "bit_floor": ",".join(order[:k])}
        print(json.dumps(choice) if a.json else f"chosen: k = {k}, --bit-floor {choice['bit_floor'] or '(none)'}")


if __name__ == "__main__":
    main()
