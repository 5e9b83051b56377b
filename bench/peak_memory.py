"""Peak memory and time of `cadyq upscale` on a big image: whole processes, one after another.

    python bench/peak_memory.py [--size 1500x1000] [--scale 4] [--threads N] [--torch]

The input is examples/scene.png resized (bicubic) to --size; each row is one `cadyq upscale` process
(the default OpenVINO runtime, run twice so that its compiled graphs are cached and the second run is
timed; with --torch also `CADYQ_KERNELS=torch`), its peak resident memory (the child's ru_maxrss) and
wall time. The issue's bound: 1500x1000 at x4 within 2 GB.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak MB) of one process (run in a fresh Python that reports its child's peak)."""
    code = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t\n"
            "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
            "print(dt, peak) if r.returncode == 0 else sys.exit(r.returncode)\n")
    res = subprocess.run([sys.executable, "-c", code, *cmd], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    secs, peak = res.stdout.split()
    return float(secs), float(peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1500x1000")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--torch", action="store_true", help="also the PyTorch engine")
    a = p.parse_args()
    from PIL import Image

    w, h = (int(v) for v in a.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="cadyq_mem_"))
    src = work / "in.png"
    Image.open(ROOT / "examples" / "scene.png").convert("RGB").resize((w, h), Image.BICUBIC).save(src)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("CADYQ_CACHE_DIR", str(work / "cache"))
    base = [sys.executable, "-m", "cadyq_cli", "upscale", str(src), str(work / "out.png"), "--scale", str(a.scale),
            "--overwrite", "-q"] + (["--threads", str(a.threads)] if a.threads else [])
    rows = {"cadyq upscale (default)": ({}, 2)}
    if a.torch:
        rows["CADYQ_KERNELS=torch cadyq upscale"] = ({"CADYQ_KERNELS": "torch"}, 1)
    print(f"{w}x{h} x{a.scale}:")
    for name, (extra, times) in rows.items():
        for _ in range(times):
            secs, peak = run(base, dict(env, **extra))
        print(f"  {name:36s} {secs:7.1f} s  peak {peak:7.0f} MB")


if __name__ == "__main__":
    main()
