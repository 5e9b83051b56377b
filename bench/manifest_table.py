"""Tables of the shipped models from weights/manifest.json (numbers measured by `cadyq eval`).

Usage:
    python bench/manifest_table.py              # print one table per model
    python bench/manifest_table.py --doc        # rewrite docs/results.md
    python bench/manifest_table.py --readme     # rewrite the models table in README.md (between its markers)
    python bench/manifest_table.py --check      # exit 1 when docs/results.md or the README table is stale
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- models table: python bench/manifest_table.py --readme -->", "<!-- end of models table -->"


def _changes(stage: dict) -> str:
    """Settings changed when the stage was resumed, e.g. ' (from step 173: bit_weight_max 0.3 -> 0.5)'."""
    parts = [f"from step {c['step']}: " + ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in c["config_change"].items())
             for c in stage.get("changes", [])]
    return f" ({'; '.join(parts)})" if parts else ""


def model_tables(manifest: dict) -> str:
    """One markdown table per shipped model: PSNR / SSIM (and FAB) per dataset and mode."""
    out = []
    for m in manifest["models"]:
        steps = ", ".join(f"{s['stage']} {s['steps']} steps / {s['minutes']} min{_changes(s)}" for s in m.get("stages", []))
        metrics = m.get("metrics", {})
        kernels = sorted({r["kernels"] for v in metrics.values() for r in v.values() if "kernels" in r})
        how = f"; quantized modes measured with {' and '.join(kernels)} kernels" if kernels else ""
        file = f"`{m['file']}` for x" + "/x".join(map(str, m["scales"])) if m.get("scales") else ""
        stored = f"{m['storage']} kernels" if m.get("storage", "float32") != "float32" else ""
        extra = "".join(f"; {x}" for x in (file, stored) if x)
        out.append(f"**{m['name']}** ({m['arch']}, x{m['scale']}, {m['params'] / 1e6:.2f} M parameters{extra}; {steps}{how})\n")
        modes = [md for md in ("bicubic", "fp32", "w8a8", "w8a4", "dynamic") if any(md in v for v in metrics.values())]
        out.append("| dataset | " + " | ".join(modes) + " |")
        out.append("|---|" + "---|" * len(modes))
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
            out.append(f"| {ds} ({n}) | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def readme_table(manifest: dict) -> str:
    """The README's models table: dynamic against w8a8 on Set5 and Urban100 (first 20), with the FAB."""
    rows = ["| model | grid, skip | Set5: dynamic / w8a8 (FAB) | Urban100/20: dynamic / w8a8 (FAB) | recipe, backbone |",
            "|---|---|---|---|---|"]
    for m in manifest["models"]:
        cells = []
        for ds in ("Set5", "Urban100"):
            d, q = m["metrics"][ds]["dynamic"], m["metrics"][ds]["w8a8"]
            cells.append(f"{d['psnr']:.2f} / {q['psnr']:.2f} ({d['fab']:.2f})")
        rows.append(f"| `{m['name']}` | {m.get('act_grid', 'signed')}, {m.get('skip', 'official')} | {cells[0]} | {cells[1]} "
                    f"| `{m.get('recipe', '')}`, " + (f"`{m['backbone']}` |" if m.get("backbone") else "from scratch |"))
    return "\n".join(rows)


def results_doc(manifest: dict) -> str:
    """docs/results.md: every shipped model's benchmark table and training stages, and the backbones."""
    bb = ["| backbone | scale | from run (step) | validation PSNR | file |", "|---|---|---|---|---|"]
    for b in manifest.get("backbones", []):
        bb.append(f"| `{b['name']}` | x{b['scale']} | {b['run']} ({b['steps']}) | {b['final_val_psnr']:.3f} | "
                  f"`weights/{b['file']}` |")
    return "\n".join([
        "# Results of the shipped models",
        "",
        "Generated from `weights/manifest.json` by `python bench/manifest_table.py --doc`; do not edit by hand.",
        "PSNR / SSIM on Y (shave = scale) with `cadyq eval --tiling paper` (the official 96/90 patches), FAB the",
        "mean bits the selectors chose ([protocol](protocol.md)). Urban100 is its first 20 images (`--limit 20`);",
        "the other sets are whole. Each heading lists the training stages (steps / minutes on a 2-core CPU; the",
        "settings a resume changed in brackets); the recipes in `recipes/` hold every setting",
        "([training](training.md)).",
        "",
        model_tables(manifest),
        "## Full-precision backbones",
        "",
        "The fp models the shipped lineages start from, weights only (`cadyq train pams|fp --init FILE`):",
        "",
        *bb,
        "",
    ])


def _replace_readme(text: str, table: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no models table markers ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    return head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1]


def main() -> None:
    """See the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, default=ROOT / "weights" / "manifest.json")
    p.add_argument("--doc", action="store_true", help="rewrite docs/results.md")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's models table")
    p.add_argument("--check", action="store_true", help="exit 1 when docs/results.md or README.md's table is stale")
    a = p.parse_args()
    manifest = json.loads(a.manifest.read_text())
    doc, readme = ROOT / "docs" / "results.md", ROOT / "README.md"
    want_doc, want_readme = results_doc(manifest), _replace_readme(readme.read_text(), readme_table(manifest))
    if a.check:
        stale = [str(f.relative_to(ROOT)) for f, want in ((doc, want_doc), (readme, want_readme))
                 if not f.is_file() or f.read_text() != want]
        if stale:
            sys.exit(f"stale: {', '.join(stale)} (python bench/manifest_table.py --doc --readme)")
        return
    if a.doc:
        doc.write_text(want_doc)
    if a.readme:
        readme.write_text(want_readme)
    if not (a.doc or a.readme):
        print(model_tables(manifest))


if __name__ == "__main__":
    main()
