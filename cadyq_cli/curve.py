"""The trade-off curve of a model: PSNR against FAB and against BitOPs as the compute dial turns.

:func:`curve_modes` lists the modes to evaluate (the fixed points fp32, w8a8, w8a4 and the
dynamic mode at a range of bit biases); :func:`curve_rows` turns an evaluation into one row
per dataset and point; :func:`plot_curve` draws them (matplotlib, the ``plot`` extra).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .errors import CadyqError
from .evaluate import EvalResult, split_mode

__all__ = ["DEFAULT_BIASES", "curve_modes", "curve_rows", "write_curve_csv", "read_curve_csv", "require_matplotlib", "plot_curve"]

#: Bit biases of the dynamic points (logit units; > 0 fewer bits).
DEFAULT_BIASES = (-16.0, -4.0, -1.0, 0.0, 1.0, 4.0, 16.0)

_FIXED = ("fp32", "w8a8", "w8a4")
CURVE_FIELDS = ("dataset", "mode", "bit_bias", "fab", "bitops_g", "psnr", "ssim")


def curve_modes(biases: tuple[float, ...] = DEFAULT_BIASES) -> list[str]:
    """The eval modes behind a curve: the fixed points, then ``dynamic@B`` for each bias."""
    return [*_FIXED, *(f"dynamic@{b:g}" for b in biases)]


def curve_rows(result: EvalResult) -> list[dict]:
    """One dict per dataset and mode (CURVE_FIELDS), dynamic points sorted by bias."""
    rows = []
    for r in result.results:
        if r.mode == "bicubic":
            continue
        base, bias = split_mode(r.mode)
        rows.append({
            "dataset": r.dataset, "mode": base, "bit_bias": bias if base == "dynamic" else None,
            "fab": r.fab, "bitops_g": None if r.bitops is None else r.bitops / 1e9, "psnr": r.psnr, "ssim": r.ssim,
        })
    return rows


def write_curve_csv(rows: list[dict], path: str | Path) -> None:
    """Write :func:`curve_rows` as CSV (empty cells for missing values)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, CURVE_FIELDS)
        wr.writeheader()
        for row in rows:
            wr.writerow({k: "" if row[k] is None else (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k])
                         for k in CURVE_FIELDS})


def read_curve_csv(path: str | Path) -> list[dict]:
    """Rows written by :func:`write_curve_csv`, numbers as floats (None where empty)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (v if k in ("dataset", "mode") else (float(v) if v else None)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def require_matplotlib() -> object:
    """``matplotlib.pyplot`` on the Agg backend; CadyqError (how to install it) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CadyqError("--curve needs matplotlib: pip install 'cadyq[plot]'") from None
    return plt


def plot_curve(rows: list[dict], path: str | Path, title: str) -> None:
    """PSNR vs FAB (left) and vs BitOPs (right), one colour per dataset; the dynamic points as a
    line (labelled with their bias), fp32/w8a8/w8a4 as markers. Needs matplotlib."""
    plt = require_matplotlib()
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.6 * len(datasets)), squeeze=False)
    fixed = {"w8a8": ("s", "tab:red"), "w8a4": ("v", "tab:green")}
    for i, ds in enumerate(datasets):
        mine = [r for r in rows if r["dataset"] == ds]
        dyn = sorted((r for r in mine if r["mode"] == "dynamic"), key=lambda r: r["bit_bias"])
        for ax, key, label in ((axes[i][0], "fab", "FAB (bits)"), (axes[i][1], "bitops_g", "BitOPs (G per image)")):
            ax.plot([r[key] for r in dyn], [r["psnr"] for r in dyn], "o-", color="tab:blue", label="dynamic (bit bias)")
            for r in dyn:
                ax.annotate(f"{r['bit_bias']:+g}", (r[key], r["psnr"]), textcoords="offset points", xytext=(5, 3),
                            fontsize=7, color="tab:blue")
            for r in mine:
                if r["mode"] in fixed:
                    marker, color = fixed[r["mode"]]
                    ax.plot(r[key], r["psnr"], marker, ms=9, color=color, alpha=0.8, label=r["mode"])
                elif r["mode"] == "fp32":  # its FAB (32) and BitOPs would squash the axis: a level line
                    ax.axhline(r["psnr"], color="grey", ls="--", lw=0.8, label=f"fp32 ({r[key]:g})" if key == "fab"
                               else f"fp32 ({r[key]:.0f} G)")
            ax.set_xlabel(label)
            ax.set_ylabel("PSNR (dB, Y)")
            ax.set_title(f"{ds}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)  # never a half-written figure
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
