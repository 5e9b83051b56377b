"""Whole-process benchmark: `cadyq upscale` (defaults) against a plain FP32 PyTorch forward.

Prints, measured side by side in one run (interleaved repetitions, medians):
  1. `cadyq upscale` (EDSR-baseline x4, dynamic, seamless tiling) / plain FP32 whole-image
     forward (bench/plain_fp32.py), whole process against whole process. Target <= 1.10.
  3. Scaling: time and peak RSS of `cadyq upscale` for inputs of 0.25, 1 and 4 megapixels
     (``--scaling``; slow on 2 cores), plus 1500x1000 (the memory target: at most 2 GB).
     Target: linear time, peak memory bounded by tile size.

Usage: python bench/bench_upscale.py [--weights W] [--size 320x240] [--reps 3] [--scaling [--scaling-sizes 1500x1000]]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _image(path: Path, w: int, h: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    img = np.clip(base[:, :, None] + rng.normal(0, 12, (h, w, 3)) * (xx[:, :, None] > w // 2), 0, 255)
    Image.fromarray(img.astype(np.uint8)).save(path)


def _run(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB of this child alone: ``os.wait4`` returns its own rusage)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return dt, usage.ru_maxrss / 1024.0


def main() -> None:
    """Run the benchmark and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="weights file (default: shipped edsr-baseline-x4)")
    p.add_argument("--size", default="320x240", help="LR input size WxH")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--scaling", action="store_true", help="also run the 0.25/1/4 MP scaling test")
    p.add_argument("--scaling-sizes", default="577x433,1155x866,1500x1000,2309x1732",
                   help="inputs of the scaling test, WxH list (default: 0.25, 1, 1.5, 4 MP)")
    a = p.parse_args()
    if a.weights is None:
        sys.path.insert(0, str(ROOT))
        from cadyq_cli.weights import resolve_weights

        a.weights = str(resolve_weights("edsr-baseline", 4).path)
    w, h = map(int, a.size.lower().split("x"))
    cadyq = [str(Path(sys.executable).parent / "cadyq")]
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.png"
        _image(src, w, h)
        ours, plain = [], []
        for i in range(a.reps):
            out1, out2 = Path(d) / f"a{i}.png", Path(d) / f"b{i}.png"
            ours.append(_run(cadyq + ["upscale", str(src), str(out1), "--weights", a.weights, "--quiet"])[0])
            plain.append(_run([sys.executable, str(ROOT / "bench" / "plain_fp32.py"), a.weights, str(src), str(out2)])[0])
        mo, mp = statistics.median(ours), statistics.median(plain)
        print(f"machine: {os.cpu_count()} CPUs; input {w}x{h} at x4; {a.reps} interleaved reps, medians")
        print(f"{'cadyq upscale (dynamic, seamless)':40s} {mo:7.2f} s")
        print(f"{'plain FP32 PyTorch forward':40s} {mp:7.2f} s")
        print(f"ratio cadyq / plain FP32 = {mo / mp:.2f}  (target <= 1.10: {'met' if mo / mp <= 1.10 else 'MISSED'}; "
              f"with integer kernels <= 0.6: {'met' if mo / mp <= 0.6 else 'missed'})")
        if a.scaling:
            print("\nscaling (cadyq upscale, x4):")
            base = None
            for side_w, side_h in (tuple(map(int, v.lower().split("x"))) for v in a.scaling_sizes.split(",")):
                mpx = side_w * side_h / 1e6
                srcs = Path(d) / f"s{mpx}.png"
                _image(srcs, side_w, side_h)
                dt, rss = _run(cadyq + ["upscale", str(srcs), str(Path(d) / f"o{mpx}.png"), "--weights", a.weights, "--quiet"])
                base = base or dt / mpx
                print(f"  {side_w}x{side_h} ({mpx:4.2f} MP): {dt:7.1f} s  ({dt / mpx / base:.2f}x linear)  peak RSS {rss:7.0f} MiB")


if __name__ == "__main__":
    main()
