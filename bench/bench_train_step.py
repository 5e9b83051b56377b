"""Training-step time of EDSR-baseline x4 in fp32 and under bf16 autocast, on this CPU.

Shows whether `cadyq train --bf16 auto` should turn autocast on here (it decides with a smaller
one-conv probe, `cadyq_cli.train.host.bf16_helps`). Native bf16 (AVX-512 BF16, AMX) makes
autocast faster; on AVX2-only CPUs it is emulated and far slower.

Usage: python bench/bench_train_step.py [--threads 2] [--batch 8] [--reps 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cadyq_cli.models import create_model  # noqa: E402
from cadyq_cli.quant.modules import set_quant_mode  # noqa: E402
from cadyq_cli.train.host import bf16_helps  # noqa: E402


def main() -> None:
    """Time forward + backward + Adam step for the fp and cadyq (dynamic) stages, both precisions."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.rand(a.batch, 3, 48, 48) * 255
    y = torch.rand(a.batch, 3, 192, 192) * 255
    print(f"EDSR-baseline x4, batch {a.batch} of 48x48 LR, {a.threads} threads, median of {a.reps} steps (after one warm-up)")
    for stage, mode in (("fp", "fp32"), ("cadyq", "dynamic")):
        model = create_model("edsr_baseline", 4)
        set_quant_mode(model, mode)
        model.train()
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        med = {}
        for bf16 in (False, True):
            times = []
            for _ in range(a.reps + 1):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    sr, _ = model(x)
                loss = (sr.float() - y).abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t)
            med[bf16] = statistics.median(times[1:])
        print(f"{stage:6s} fp32 {med[False]:6.2f} s   bf16 {med[True]:6.2f} s   bf16 / fp32 = {med[True] / med[False]:.2f}")
    print(f"bf16_helps() (the --bf16 auto probe): {bf16_helps(a.threads)}")


if __name__ == "__main__":
    main()
