"""The learned input shifts (``--act-shift``) of a run, and a lineage against another at matched validation steps.

    python bench/act_shift_report.py shifts RUN/pick/last.pt
        each shift's size in units of its selector's 4-bit step (alpha_4 / qmax_4), signed and unsigned inputs apart
    python bench/act_shift_report.py compare recipes/logs/edsr_x4_cadyq_uf3 recipes/logs/edsr_x4_cadyq_sh2
        validation dynamic PSNR and FAB of the second lineage minus the first at every step both logged (a lineage
        is the run folder given and its continuations ``_v2``, ``_v3``, ...), and their means

The numbers of docs/training.md's "learned input shifts" item come from these two commands.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def shift_sizes(ckpt: Path) -> None:
    """Print the mean, 95th percentile and largest |t| / step per grid."""
    from cadyq_cli.checkpoint import load_model_file
    from cadyq_cli.quant.primitives import qmax_for_bits

    model = load_model_file(ckpt)
    rel: dict[str, list[torch.Tensor]] = {"signed": [], "unsigned": []}
    for sel in model.selectors:
        if sel.act_shift is not None:
            step = float(sel.quant_bit1.alpha.detach()) / qmax_for_bits(4, sel.signed)
            rel["signed" if sel.signed else "unsigned"].append(sel.act_shift.detach().abs() / step)
    if not any(rel.values()):
        raise SystemExit(f"{ckpt}: no learned input shifts")
    for grid, parts in rel.items():
        if parts:
            r = torch.cat(parts)
            print(f"{grid} inputs: |t| in 4-bit steps: mean {r.mean():.3f}, 95th percentile {r.quantile(0.95):.3f}, "
                  f"max {r.max():.3f}")


def _lineage(first: Path) -> dict[int, tuple[float, float]]:
    out: dict[int, tuple[float, float]] = {}
    for run in [first] + sorted(first.parent.glob(first.name + "_v*")):
        for line in (run / "log.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "val_fab" in r and "step" in r:
                out[r["step"]] = (r["val_psnr"], r["val_fab"])
    return out


def compare(a: Path, b: Path) -> None:
    """Print b − a at each shared validation step and the means."""
    la, lb = _lineage(a), _lineage(b)
    steps = sorted(set(la) & set(lb))
    if not steps:
        raise SystemExit("the two lineages share no validation step")
    d = [(lb[s][0] - la[s][0], lb[s][1] - la[s][1]) for s in steps]
    for s, (dp, df) in zip(steps, d):
        print(f"step {s:5d}  PSNR {dp:+.3f} dB  FAB {df:+.3f}")
    print(f"{len(steps)} steps: mean {sum(x for x, _ in d) / len(d):+.4f} dB (from {min(x for x, _ in d):+.3f} to "
          f"{max(x for x, _ in d):+.3f}), FAB {sum(y for _, y in d) / len(d):+.4f}")


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("shifts").add_argument("ckpt", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = p.parse_args()
    shift_sizes(a.ckpt) if a.cmd == "shifts" else compare(a.a, a.b)


if __name__ == "__main__":
    main()
