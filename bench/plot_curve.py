"""Redraw a trade-off curve from the CSV that ``cadyq eval --curve-csv`` wrote (no re-evaluation).

Usage: python bench/plot_curve.py CURVE.csv OUT.png [--title TEXT]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cadyq_cli.curve import plot_curve, read_curve_csv  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("csv")
p.add_argument("png")
p.add_argument("--title", default="edsr-baseline-x4 x4: PSNR against cost as the bit bias turns (paper tiling)")
a = p.parse_args()
plot_curve(read_curve_csv(a.csv), a.png, a.title)
