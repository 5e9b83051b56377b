"""Achieved conv throughput of an EDSR-baseline x4 forward against what this machine can do.

Measured in one run (interleaved repetitions, medians), on one LR image of --size:

* the machine's practical peaks: a large float32 GEMM (``torch.mm``), a large bf16 GEMM, and a
  large int8 GEMM with exact int32 sums (``torch._int_mm``), in G(FL)OP/s;
* the model in ``fp32`` mode, and in ``dynamic`` mode with float kernels and, where this CPU
  has exact int8 kernels (VNNI/AMX), with int8 kernels:
  seconds, and the conv work it did (2 x MACs, from the model's cost table) per second, split
  into the quantized body convs and the full-precision layers (head, upsampler, tail).

The full-precision layers bound how fast a quantized model can get: their share of the fp32
time is printed as the floor of ``dynamic / fp32`` were the quantized convs free.

Usage: python bench/bench_gflops.py [--size 160x120] [--reps 3] [--threads N] [--weights W]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cadyq_cli.quant import set_quant_mode  # noqa: E402
from cadyq_cli.quant.cost import cost_table  # noqa: E402
from cadyq_cli.quant.intconv import set_kernels  # noqa: E402
from cadyq_cli.quant.modules import QuantConv2d  # noqa: E402
from cadyq_cli.quant.regions import RegionGrid
from cadyq_cli.weights import load_model  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from _timing import interleaved  # noqa: E402


def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    return interleaved({"f": fn}, reps)[1]["f"]


def gemm_peaks(reps: int) -> dict[str, float]:
    """Practical peak rates from large GEMMs: fp32, bf16 (G FLOP/s) and int8 (G OP/s)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    ab, bb = a.bfloat16(), b.bfloat16()
    ai = torch.randint(-127, 128, (n, n), dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), dtype=torch.int8)
    ops = 2.0 * n**3
    return {
        "fp32 GEMM": ops / _median_time(lambda: torch.mm(a, b), reps) / 1e9,
        "bf16 GEMM": ops / _median_time(lambda: torch.mm(ab, bb), reps) / 1e9,
        "int8 GEMM (int32 sums)": ops / _median_time(lambda: torch._int_mm(ai, bi), reps) / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="160x120", help="LR input WxH")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--region", type=int, default=96, help="bits per REGION x REGION px (the CLI default)")
    p.add_argument("--weights", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    w, h = map(int, a.size.lower().split("x"))
    model = load_model(weights=a.weights, scale=4) if a.weights else load_model("edsr-baseline", scale=4)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    x = (128 + 80 * torch.sin(xx / 9) * torch.cos(yy / 13) + torch.randn(1, 3, h, w, generator=g) * 15).clamp(0, 255)
    grid = RegionGrid.uniform(h, w, a.region)

    table = cost_table(model)
    quant_names = {n for n, m in model.named_modules() if isinstance(m, QuantConv2d)}
    macs_q = sum(c.macs_per_px for c in table if c.name in quant_names) * w * h
    macs_fp = sum(c.macs_per_px for c in table if c.name not in quant_names) * w * h

    fp_layers: list[torch.nn.Module] = [m for n, m in model.named_modules()
                                        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
                                        and n not in quant_names and n in {c.name for c in table}]

    def run(mode: str, kernels: str) -> Callable[[], object]:
        def f() -> object:
            set_quant_mode(model, mode)
            set_kernels(model, kernels)
            with torch.inference_mode():
                return model(x, grid)
        return f

    auto = set_kernels(model, "auto")  # "int8" only where exact int8 kernels exist (VNNI/AMX)
    variants = {"fp32": run("fp32", "float")}
    if auto == "int8":
        variants["dynamic (int8 kernels)"] = run("dynamic", "int8")
    variants["dynamic (float kernels)"] = run("dynamic", "float")
    for f in variants.values():
        f()
    _, med = interleaved(variants, a.reps)

    # time spent in the full-precision layers, measured with hooks in fp32 mode
    spent = [0.0]
    starts: dict[int, float] = {}
    hooks = [m.register_forward_pre_hook(lambda m, i: starts.__setitem__(id(m), time.perf_counter())) for m in fp_layers]
    hooks += [m.register_forward_hook(lambda m, i, o: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[id(m)]))
              for m in fp_layers]
    fp_layer_s = []
    for _ in range(a.reps):
        spent[0] = 0.0
        run("fp32", "float")()
        fp_layer_s.append(spent[0])
    for hk in hooks:
        hk.remove()
    fp_share = statistics.median(fp_layer_s) / med["fp32"]

    peaks = gemm_peaks(a.reps)
    print(f"EDSR-baseline x4 on {w}x{h} LR, threads={torch.get_num_threads()}, {a.reps} reps (median)")
    print(f"conv work: quantized body {2 * macs_q / 1e9:.2f} GFLOP, full-precision layers {2 * macs_fp / 1e9:.2f} GFLOP "
          f"({macs_fp / (macs_q + macs_fp):.0%} of all)")
    print("machine (practical peaks from large GEMMs):")
    for k, v in peaks.items():
        print(f"  {k:<26} {v:8.1f} G/s")
    print(f"{'variant':<26} {'seconds':>8} {'G/s (all convs)':>16} {'/ fp32 peak':>12}")
    for k, t in med.items():
        rate = 2 * (macs_q + macs_fp) / t / 1e9
        print(f"{k:<26} {t:8.3f} {rate:16.1f} {rate / peaks['fp32 GEMM']:12.2f}")
    print(f"full-precision layers take {fp_share:.0%} of the fp32 forward: with free quantized convs, "
          f"dynamic / fp32 could not go below ~{fp_share:.2f}")
    if auto != "int8":
        print("int8 kernels: not available on this CPU (no VNNI/AMX), so only the float path ran")
    best = f"dynamic ({auto} kernels)"
    print(f"{best} / fp32 = {med[best] / med['fp32']:.2f}")


if __name__ == "__main__":
    main()
