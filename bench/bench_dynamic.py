"""Benchmark of dynamic (CADyQ) inference: ours batched vs the official per-patch style vs FP32.

EDSR-baseline x4 with random weights in the official format, clip values calibrated on a few
patches and random selector heads (so the chosen bits vary), on N patches of 96x96 LR with
random textured content. Measured side by side in one run, repetitions interleaved, medians:

  (a) dynamic        our model in ``dynamic`` mode, one forward of the whole batch
                     (inference_mode), with the default kernels: quantized convs on int8
                     codes where the CPU has exact int8 kernels (VNNI/AMX);
  (a') dynamic-float  the same with ``--kernels float`` (fake-quantized float convs, the
                     reference operation order);
  (b) official       the official style: each patch alone at batch 1, weights re-quantized on
                     every call, all three candidate quantizations and the STE expression at
                     every selector (tests/official_reference.official_forward);
  (c) fp32           our model in ``fp32`` mode, one forward of the batch (no quantization code
                     on the path).

Targets: dynamic within 1.10x of FP32; at least 1.35x faster than the official style.

With ``--image WxH`` it compares instead, on one synthetic LR image of that size (issue 6,
item 2): ``cadyq``'s engine (dynamic; seamless tiling, and paper tiling = the official
96/90 patch protocol, batched) against the official-style patch loop
(tests/official_reference.official_patch_test) and a plain FP32 whole-image forward.

Usage: python bench/bench_dynamic.py [--threads N] [--reps 3] [--patches 16] [--size 96] [--image 320x240]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadyq_cli.checkpoint import model_from_state_dict  # noqa: E402
from cadyq_cli.quant import set_quant_mode  # noqa: E402
from cadyq_cli.quant.intconv import set_kernels  # noqa: E402
from tests import official_reference as ref  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from _timing import interleaved  # noqa: E402

TARGET_DYN_VS_FP32 = 1.10
TARGET_OFFICIAL_VS_DYN = 1.35


def textured_patches(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) float 0..255: smooth waves, edges and noise in varying amounts."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    out = []
    for i in range(n):
        f = 3.0 + 10.0 * float(torch.rand(1, generator=g))
        base = 128 + 70 * torch.sin(xx / f + i) * torch.cos(yy / (f * 1.3) - i)
        edges = 60.0 * ((xx + 2 * yy + 7 * i) % (size // 3) < size // 6).float()
        noise = torch.randn(3, size, size, generator=g) * (40.0 * i / max(n - 1, 1))
        rgb = torch.stack([base, base * 0.8 + 20, base * 0.6 + 40]) + edges + noise
        out.append(rgb.clamp(0, 255).round())
    return torch.stack(out)


def build(size: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """Official-format EDSR x4 state dict (calibrated clips) and our model loaded from it."""
    sd = ref.random_official_state_dict("edsr", 4, "cadyq", seed=seed)
    calib = textured_patches(2, min(size, 48), seed=seed + 100)
    sd = ref.calibrate_alphas(sd, "edsr", 4, calib)
    model = model_from_state_dict(sd, "edsr", 4)
    return sd, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    p.add_argument("--patches", type=int, default=16, help="number of LR patches")
    p.add_argument("--size", type=int, default=96, help="LR patch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", default=None, help="WxH: whole-image comparison instead of patches")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.image:
        return image_bench(a)

    sd, model = build(a.size, a.seed)
    x = textured_patches(a.patches, a.size, seed=a.seed)

    kernels = set_kernels(model, "auto")

    def ours(mode: str, kern: str = kernels) -> Callable[[], object]:
        def run() -> object:
            set_quant_mode(model, mode)
            set_kernels(model, kern)
            with torch.inference_mode():
                return model(x)
        return run

    def official() -> object:
        return ref.official_forward(sd, "edsr", 4, x)  # loops over the patches at batch 1

    variants: dict[str, Callable[[], object]] = {"dynamic": ours("dynamic"), "dynamic-float": ours("dynamic", "float"),
                                                 "official": official, "fp32": ours("fp32")}

    # warm-up on one patch each (allocator, oneDNN primitive caches), and a bits sanity check
    x_full = x
    x = x_full[:1]
    for fn in variants.values():
        fn()
    x = x_full
    set_quant_mode(model, "dynamic")
    set_kernels(model, kernels)
    with torch.inference_mode():
        _, bits = model(x)
    hist = {b: int((bits == b).sum()) for b in (4, 6, 8)}

    times, med = interleaved(variants, a.reps)

    print(f"EDSR-baseline x4, {a.patches} patches of {a.size}x{a.size} LR, threads={torch.get_num_threads()}, "
          f"reps={a.reps} (median); dynamic runs with {kernels} kernels")
    print(f"bits chosen (dynamic): {hist}, FAB {float(bits.mean()):.2f}")
    print(f"{'variant':<14} {'median s':>9} {'per patch ms':>13}   all reps (s)")
    for k in variants:
        print(f"{k:<14} {med[k]:9.3f} {1000 * med[k] / a.patches:13.1f}   "
              + " ".join(f"{t:.3f}" for t in times[k]))
    r_fp = med["dynamic"] / med["fp32"]
    r_off = med["official"] / med["dynamic"]
    print(f"dynamic / fp32      = {r_fp:.3f}  (target <= {TARGET_DYN_VS_FP32:.2f})")
    print(f"dynamic-float / fp32 = {med['dynamic-float'] / med['fp32']:.3f}  (float kernels, for reference)")
    print(f"official / dynamic  = {r_off:.3f}  (target >= {TARGET_OFFICIAL_VS_DYN:.2f})")
    ok_fp = r_fp <= TARGET_DYN_VS_FP32
    ok_off = r_off >= TARGET_OFFICIAL_VS_DYN
    verdict = "PASS" if ok_fp and ok_off else "FAIL"
    print(f"verdict: {verdict} (dynamic vs fp32 {'ok' if ok_fp else 'MISSED'}, "
          f"vs official style {'ok' if ok_off else 'MISSED'})")


def image_bench(a: argparse.Namespace) -> None:
    """Whole image: our engine (seamless / paper tiling) vs the official patch loop vs FP32."""
    import numpy as np

    from cadyq_cli.engine import TilingConfig, upscale_array

    w, h = map(int, a.image.lower().split("x"))
    sd, model = build(96, a.seed)
    kernels = set_kernels(model, "auto")
    img = (textured_patches(1, max(w, h), seed=a.seed)[0, :, :h, :w].permute(1, 2, 0).round().byte().numpy())

    def ours(tiling: str) -> Callable[[], object]:
        def run() -> object:
            set_quant_mode(model, "dynamic")
            return upscale_array(model, img.astype(np.float32), TilingConfig(tiling=tiling))
        return run

    def fp32() -> object:
        set_quant_mode(model, "fp32")
        with torch.inference_mode():
            return model(torch.from_numpy(img).permute(2, 0, 1)[None].float())

    variants: dict[str, Callable[[], object]] = {
        "ours seamless": ours("seamless"), "ours paper": ours("paper"),
        "official": lambda: ref.official_patch_test(sd, "edsr", 4, img), "fp32 whole": fp32,
    }
    for fn in variants.values():
        fn()
    times, med = interleaved(variants, a.reps)
    print(f"EDSR-baseline x4 (random official-format weights), one {w}x{h} LR image, "
          f"threads={torch.get_num_threads()}, reps={a.reps} (median); dynamic runs with {kernels} kernels")
    for k in variants:
        print(f"{k:<14} {med[k]:8.2f} s   " + " ".join(f"{t:.2f}" for t in times[k]))
    for k in ("ours seamless", "ours paper"):
        print(f"official / {k:<14} = {med['official'] / med[k]:.2f}  (target >= 1.4; 3 with integer kernels)")
    print(f"ours seamless / fp32 whole = {med['ours seamless'] / med['fp32 whole']:.2f}")


if __name__ == "__main__":
    main()
