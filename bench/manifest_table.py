"""Print the README quality table from weights/manifest.json (numbers measured by `cadyq eval`).

Usage: python bench/manifest_table.py [--manifest weights/manifest.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _changes(stage: dict) -> str:
    """Settings changed when the stage was resumed, e.g. ' (from step 173: bit_weight_max 0.3 -> 0.5)'."""
    parts = [f"from step {c['step']}: " + ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in c["config_change"].items())
             for c in stage.get("changes", [])]
    return f" ({'; '.join(parts)})" if parts else ""


def main() -> None:
    """Print one markdown table per shipped model."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, default=ROOT / "weights" / "manifest.json")
    a = p.parse_args()
    for m in json.loads(a.manifest.read_text())["models"]:
        steps = ", ".join(f"{s['stage']} {s['steps']} steps / {s['minutes']} min{_changes(s)}" for s in m.get("stages", []))
        metrics = m.get("metrics", {})
        kernels = sorted({r["kernels"] for v in metrics.values() for r in v.values() if "kernels" in r})
        how = f"; quantized modes measured with {' and '.join(kernels)} kernels" if kernels else ""
        print(f"**{m['name']}** ({m['arch']}, x{m['scale']}, {m['params'] / 1e6:.2f} M parameters; {steps}{how})\n")
        modes = [md for md in ("bicubic", "fp32", "w8a8", "w8a4", "dynamic") if any(md in v for v in metrics.values())]
        print("| dataset | " + " | ".join(modes) + " |")
        print("|---|" + "---|" * len(modes))
        for ds, by_mode in metrics.items():
            cells = []
            for md in modes:
                r = by_mode.get(md)
                if r is None:
                    cells.append("")
                    continue
                cell = f"{r['psnr']:.2f} / {r['ssim']:.4f}"
                if md in ("w8a4", "dynamic", "w8a8") and r.get("fab") is not None:
                    cell += f" (FAB {r['fab']:.2f})"
                cells.append(cell)
            n = max((r.get("images", 0) for r in by_mode.values()), default=0)
            print(f"| {ds} ({n}) | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
