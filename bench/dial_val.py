"""The compute dial on the held-out validation images: dynamic PSNR and FAB per bit bias, against w8a8.

Runs one model (a shipped EDSR-baseline or a checkpoint) on the held-out validation images of
the training folders (a training checkpoint's or --wip file's own split, from its config; for a shipped
file the recipes': 10 images, seed 0; never a benchmark set), as
`cadyq eval --tiling paper` runs them: w8a8 once, then dynamic at bias 0 and at each ``--biases``
value (`--bit-bias B`: B > 0 fewer bits, B < 0 more). Prints one row per setting: PSNR (Y, shave =
scale), its difference from w8a8, and FAB. Use it to choose an operating point without looking at
a benchmark.

Usage: python bench/dial_val.py SCALE [--weights W] [--biases=-1,-2,-4] [--data-root ../shared/data/train]
       [--max-gap 0.03 --max-fab 4.9]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cadyq_cli.quant.modules import set_quant_mode
from cadyq_cli.train.validate import _val_run
from cadyq_cli.weights import load_model
from _model_args import run_split, validation_pairs


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scale", type=int)
    ap.add_argument("--weights", help="checkpoint (default: the shipped edsr-baseline of this scale)")
    ap.add_argument("--biases", default="-1,-2,-4", help="comma list of bit biases besides 0")
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data/train"))
    ap.add_argument("--max-gap", type=float, help="with --max-fab: name the bias of lowest FAB within this many dB of w8a8")
    ap.add_argument("--max-fab", type=float, help="with --max-gap: ... at a FAB at most this")
    ap.add_argument("--json", action="store_true", help="one JSON line per setting instead of the table")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if (a.max_gap is None) != (a.max_fab is None):
        ap.error("--max-gap and --max-fab go together")
    biases = [0.0] + [float(b) for b in a.biases.split(",") if b.strip()]
    val = validation_pairs(a.data_root, a.scale, a.threads, run_split(a.weights))
    model = load_model(None if a.weights else "edsr-baseline", weights=a.weights, scale=a.scale, mode="w8a8")
    ref, _ = _val_run(model, val, False, True)
    rows = [{"mode": "w8a8", "bias": None, "psnr": ref, "gap": 0.0, "fab": 8.0}]
    set_quant_mode(model, "dynamic")
    for b in dict.fromkeys(biases):
        model.set_bit_bias(b)
        psnr, fabs = _val_run(model, val, False, True)
        rows.append({"mode": "dynamic", "bias": b, "psnr": psnr, "gap": psnr - ref, "fab": sum(fabs) / len(fabs)})
    model.set_bit_bias(0.0)
    if not a.json:
        print(f"weights: {a.weights or f'edsr-baseline-x{a.scale}'}, {len(val.hr)} held-out images, paper tiling")
        print(f"{'mode':8} {'bias':>6} {'PSNR':>8} {'vs w8a8':>8} {'FAB':>5}")
    for r in rows:
        if a.json:
            print(json.dumps(r))
        else:
            bias = "" if r["bias"] is None else f"{r['bias']:g}"
            print(f"{r['mode']:8} {bias:>6} {r['psnr']:8.3f} {r['gap']:+8.3f} {r['fab']:5.2f}")
    if a.max_gap is not None and a.max_fab is not None:
        ok = [r for r in rows[1:] if r["gap"] >= -a.max_gap and r["fab"] <= a.max_fab]
        best = min(ok, key=lambda r: (r["fab"], abs(r["bias"])), default=None)
        if a.json:
            print(json.dumps({"chosen_bias": None if best is None else best["bias"]}))
        else:
            print("chosen: none within the bounds" if best is None else
                  f"chosen: bias {best['bias']:g} (FAB {best['fab']:.2f}, {best['gap']:+.3f} dB from w8a8)")


if __name__ == "__main__":
    main()
