"""Pick a cadyq checkpoint on the held-out validation split, never on a benchmark.

A run trained with ``keep_val`` (``cadyq train ... --keep-val``) keeps ``step<N>.pt`` at every
validation, and each validation record holds the dynamic model's PSNR and FAB and the same
weights' ``w8a8`` PSNR. The pick is the lowest-FAB step whose dynamic PSNR is at most
``max_gap`` dB below its w8a8 PSNR: the trade-off the issue asks for, judged on images the model
never trained on.

Usage:
    python -m cadyq_cli.train.select runs/edsr_x2_cadyq_v4 --max-gap 0.05 [--into runs/edsr_x2_cadyq_v4_pick]
    python -m cadyq_cli.train.select runs/edsr_x2_cadyq_u runs/edsr_x2_cadyq_u_v2 --max-gap 0.13 --max-fab 5.7
    python -m cadyq_cli.train.select runs/edsr_x4_cadyq_v3/last.pt --validate   # one checkpoint's val numbers

Several run folders (a run and its continuations: a lineage) are one pool of kept steps; ``--max-fab``
refuses a pick above that validation FAB. Only steps with a kept checkpoint are picked. ``--into`` turns the picked step into a normal run folder (``last.pt`` + the log up to that
step), ready for ``python -m cadyq_cli.train.export`` or for resuming.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Callable

__all__ = ["read_log", "val_records", "kept_steps", "pick", "pick_lineage", "materialize", "validate_checkpoint"]


def read_log(run: Path) -> list[dict]:
    """The JSON records of ``<run>/log.jsonl``."""
    return [json.loads(ln) for ln in (Path(run) / "log.jsonl").read_text().splitlines() if ln.strip()]


def val_records(records: list[dict]) -> list[dict]:
    """Validation records that carry the w8a8 reference, one per step (the last one wins)."""
    by_step = {r["step"]: r for r in records if "val_psnr_w8a8" in r}
    return [by_step[s] for s in sorted(by_step)]


def kept_steps(run: Path) -> set[int]:
    """Steps of ``run`` that have a kept checkpoint (``step<N>.pt``)."""
    return {int(p.stem[4:]) for p in Path(run).glob("step*.pt") if p.stem[4:].isdigit()}


def pick(records: list[dict], max_gap: float, kept: set[int] | None = None) -> dict | None:
    """The lowest-FAB validation record with ``val_psnr >= val_psnr_w8a8 - max_gap`` (ties: the
    higher PSNR), among the ``kept`` steps if given; None when no step qualifies."""
    ok = [r for r in val_records(records) if r["val_psnr"] >= r["val_psnr_w8a8"] - max_gap
          and (kept is None or r["step"] in kept)]
    return min(ok, key=lambda r: (r["val_fab"], -r["val_psnr"])) if ok else None


def pick_lineage(runs: list[Path], max_gap: float, max_fab: float | None = None,
                 show: Callable[[str], None] = lambda s: None, only: dict[str, set[int]] | None = None) -> tuple[dict, Path]:
    """The pick over the kept steps of ``runs`` (one lineage: a run and its continuations) and the
    run that holds it; each run's validation steps are passed to ``show``. ``only`` (by run folder)
    limits the candidates to those steps. Refused in one line (SystemExit): a folder without a log,
    no kept step within ``max_gap``, a pick above ``max_fab``."""
    picks = []
    for run in runs:
        if not (Path(run) / "log.jsonl").is_file():
            raise SystemExit(f"{run}: no log.jsonl (not a run folder)")
        recs = read_log(run)
        kept = kept_steps(run) if only is None else kept_steps(run) & only.get(str(run), set())
        if len(runs) > 1:
            show(f"{run}:")
        for r in val_records(recs):
            show(f"step {r['step']:5d}  val {r['val_psnr']:.3f}  w8a8 {r['val_psnr_w8a8']:.3f}  "
                 f"gap {r['val_psnr'] - r['val_psnr_w8a8']:+.3f}  FAB {r['val_fab']:.2f}{'  kept' if r['step'] in kept else ''}")
        if (best := pick(recs, max_gap, kept)) is not None:
            picks.append((best, Path(run)))
    if not picks:
        raise SystemExit(f"no kept step within {max_gap} dB of w8a8 on validation")
    best, run = min(picks, key=lambda t: (t[0]["val_fab"], -t[0]["val_psnr"]))
    where = f"{run} " if len(runs) > 1 else ""
    show(f"pick: {where}step {best['step']} (FAB {best['val_fab']:.2f}, gap {best['val_psnr'] - best['val_psnr_w8a8']:+.3f} dB)")
    if max_fab is not None and best["val_fab"] > max_fab:
        raise SystemExit(f"the pick's validation FAB {best['val_fab']:.2f} is above --max-fab {max_fab}: no step meets the rule")
    return best, run


def materialize(run: Path, step: int, into: Path) -> Path:
    """Make ``into`` a run folder holding ``run``'s checkpoint at ``step``; return its last.pt."""
    src = Path(run) / f"step{step:05d}.pt"
    if not src.is_file():
        raise SystemExit(f"{src} does not exist (was the run trained with --keep-val?)")
    into = Path(into)
    if into.exists():
        raise SystemExit(f"{into} already exists")
    into.mkdir(parents=True)
    shutil.copyfile(src, into / "last.pt")
    lines = [r for r in read_log(run) if r["step"] <= step and not (r["step"] == step and r.get("final"))]
    (into / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return into / "last.pt"


def validate_checkpoint(ckpt: Path, data: list[str] | None = None) -> dict[str, float]:
    """Run :func:`~cadyq_cli.train.validate.validate` on a training checkpoint's own held-out split
    (rebuilt from its config: training folders, ``n_val``, seed; ``data`` overrides the folders),
    in the mode its stage trains: fp32 (fp), w8a8 (pams) or dynamic (cadyq, with the w8a8
    reference). Warns on stderr when the folders hold other images than the run trained on."""
    import sys

    import torch

    from ..checkpoint import load_model_file
    from ..quant.modules import set_quant_mode
    from .data import data_fingerprint, heldout_pairs
    from .state import load_state
    from .validate import validate

    cfg = load_state(Path(ckpt))["config"]
    roots = [Path(d) for d in (data or cfg["data"])]
    if cfg.get("data_id") and data_fingerprint(roots) != cfg["data_id"]:
        print(f"warning: {', '.join(map(str, roots))} differ from the images {ckpt} was trained on "  # noqa: T201
              "(the held-out split may differ)", file=sys.stderr)
    model = load_model_file(Path(ckpt))
    set_quant_mode(model, {"fp": "fp32", "pams": "w8a8"}.get(cfg["stage"], "dynamic"))
    with torch.inference_mode():
        return validate(model, heldout_pairs(roots, cfg["n_val"], cfg["seed"], cfg["scale"]),
                        bool(cfg["bf16"]) and cfg["stage"] == "fp")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                    help="run folder(s) of one lineage (or, with --validate, a checkpoint file)")
    ap.add_argument("--validate", action="store_true", help="validate the checkpoint RUN on its held-out split and exit")
    ap.add_argument("--data", action="append", help="training folders, if they moved (with --validate)")
    ap.add_argument("--max-gap", type=float, default=0.05, help="dB the dynamic PSNR may lie below w8a8 on val")
    ap.add_argument("--max-fab", type=float, help="no pick above this validation FAB")
    ap.add_argument("--into", type=Path, help="copy the picked step into this new run folder")
    a = ap.parse_args(argv)
    if a.validate:
        for ckpt in a.runs:
            print(json.dumps({"checkpoint": str(ckpt), **validate_checkpoint(ckpt, a.data)}))  # noqa: T201
        return
    best, run = pick_lineage(a.runs, a.max_gap, a.max_fab, show=print)
    if a.into:
        print(materialize(run, best["step"], a.into))  # noqa: T201


if __name__ == "__main__":
    main()
