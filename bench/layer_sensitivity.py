"""Which layer's low bits cost the most: each bit selector in turn forced to 8 bits, on the images where the
dynamic mode loses most against its own w8a8.

    python bench/layer_sensitivity.py FOLDER... [--model edsr-baseline-x4 | --weights FILE --arch edsr] [--scale 4]
        [--sample 60] [--seed 0] [--worst 10] [--threads 1]

Picks ``--sample`` images at random (seeded; 0: all) from the folders, scores each in w8a8 and dynamic mode as
`cadyq eval` does (paper tiling, Y PSNR), keeps the ``--worst`` by dynamic − w8a8, then for every selector
prints the mean PSNR change and the FAB change on them when that selector alone always picks 8 bits (its
output bias moved as the compute dial moves it, far enough to decide). A diagnosis, not a tuning tool: run it on
training images to choose anything; a benchmark run only explains a number.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from cadyq_cli.evaluate import evaluate, list_images
from _model_args import add_model_args, load_dynamic

#: an output bias that decides every choice: (4-bit, 6-bit, 8-bit) logits moved by (-F, 0, +F)
_FORCE_8 = (-1e4, 0.0, 1e4)


def main() -> None:
    """Print the per-image gaps of the worst images and each selector's forced-8-bit effect on them."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="+")
    add_model_args(p, threads=1)
    p.add_argument("--sample", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worst", type=int, default=10)
    a = p.parse_args()
    net = load_dynamic(a)
    files = [f for d in a.folders for f in list_images(d)]
    if a.sample and a.sample < len(files):
        files = [files[i] for i in sorted(np.random.default_rng(a.seed).choice(len(files), a.sample, replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        every, worst = Path(tmp) / "sample", Path(tmp) / "worst"
        every.mkdir()
        worst.mkdir()
        for f in files:  # one folder for evaluate(); names kept unique across folders
            shutil.copy(f, every / f"{f.parent.name}_{f.name}")
        res = {r.mode: {i.name: i for i in r.images} for r in evaluate([every], a.scale, net, ["w8a8", "dynamic"], False).results}
        gaps = {n: res["dynamic"][n].psnr - res["w8a8"][n].psnr for n in res["w8a8"]}
        print(f"{len(gaps)} images: dynamic - w8a8 {np.mean(list(gaps.values())):+.4f} dB (median "
              f"{np.median(list(gaps.values())):+.4f}), FAB {np.mean([i.fab for i in res['dynamic'].values()]):.3f}")
        picked = sorted(gaps, key=gaps.get)[: a.worst]
        print("worst:", ", ".join(f"{n} {gaps[n]:+.3f} (FAB {res['dynamic'][n].fab:.2f})" for n in picked))
        for n in picked:
            shutil.copy(every / n, worst / n)

        def dynamic() -> tuple[np.ndarray, float]:
            r = evaluate([worst], a.scale, net, ["dynamic"], False).results[0]
            return np.array([i.psnr for i in r.images]), float(r.fab)

        base, base_fab = dynamic()
        print("selector  dPSNR(dB)  dFAB   (forced to 8 bits, mean over the worst images)")
        for k, sel in enumerate(net.selectors):
            bias = sel.net_small[0].bias
            shift = bias.new_tensor(_FORCE_8)
            with torch.no_grad():
                bias.add_(shift)
            try:
                psnr, fab = dynamic()
            finally:
                with torch.no_grad():
                    bias.sub_(shift)
            print(f"{k:8d}  {np.mean(psnr - base):+9.4f}  {fab - base_fab:+.3f}")


if __name__ == "__main__":
    main()
