"""Images per second of `cadyq upscale` on a folder: the local engine against Ray at 1 and 2 workers.

One local Ray cluster (``--cpus``, default 2) serves every Ray run; each run starts its own actor pool (a
worker process per replica that loads the model: on the OpenVINO runtime by default, importing torch with
``--runtime torch``), as a CLI run does. Printed per engine, medians of ``--reps`` interleaved runs:
  - run: images / wall time of the whole batch, worker start included (what a user waits for);
  - steady: images per second between the first and the last result (worker start excluded);
  - efficiency: steady throughput at 2 workers / (2 x at 1 worker).
The local engine's model is loaded once, outside the timing, on ``--threads`` threads; each Ray worker runs
one thread. ``--runtime``: the OpenVINO runtime (default, as `cadyq upscale` of a shipped model) or the PyTorch
engine, for both engines.

Usage: python bench/ray_scaling.py [--images 16] [--size 96x80] [--scale 2] [--reps 2] [--cpus 2]
       [--runtime openvino|torch]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _folder(root: Path, n: int, w: int, h: int) -> Path:
    src = root / "in"
    src.mkdir(parents=True)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        rng = np.random.default_rng(i)
        base = 128 + 60 * np.sin(xx / (7.0 + i)) * np.cos(yy / 11.0)
        img = np.clip(base[:, :, None] + rng.normal(0, 12, (h, w, 3)) * (xx[:, :, None] > w // 2), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(src / f"img{i:02d}.png")
    return src


def _timed(outcomes: object) -> tuple[float, float, int]:
    """(wall seconds, steady images/s, failures) of one run, consuming its outcomes."""
    t0 = time.perf_counter()
    stamps, failed = [], 0
    for out in outcomes:  # type: ignore[attr-defined]
        stamps.append(time.perf_counter())
        failed += out.error is not None
    wall = time.perf_counter() - t0
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else float("nan")
    return wall, steady, failed


def main() -> None:
    """Run the benchmark and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", default="96x80", help="input size WxH")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--threads", type=int, default=1, help="threads of the local engine")
    p.add_argument("--runtime", choices=("openvino", "torch"), default="openvino")
    a = p.parse_args()
    import ray
    import torch

    from cadyq_cli.batch_ray import RayOptions, run_ray
    from cadyq_cli.batch import upscale_jobs
    from cadyq_cli.paths import plan_jobs
    from cadyq_cli.tiling import TilingConfig
    from cadyq_cli.weights import load_model

    w, h = (int(v) for v in a.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="cadyq_ray_bench_"))
    try:
        src = _folder(tmp, a.images, w, h)
        torch.set_num_threads(a.threads)
        if a.runtime == "openvino":
            from cadyq_cli.runtime.engine import load_openvino_model

            net = load_openvino_model(scale=a.scale, threads=a.threads)
        else:
            net = load_model(scale=a.scale)
        cfg = TilingConfig()
        t = time.perf_counter()
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        print(f"local Ray cluster: {a.cpus} CPUs, started in {time.perf_counter() - t:.1f} s")

        def jobs(tag: str) -> list:
            out = tmp / tag
            shutil.rmtree(out, ignore_errors=True)
            return plan_jobs(src, out)

        def local() -> tuple[float, float, int]:
            return _timed(upscale_jobs(net, jobs("local"), cfg))

        def on_ray(workers: int) -> tuple[float, float, int]:
            opts = RayOptions(load={"scale": a.scale}, cfg=cfg, workers=workers, threads=1,
                              openvino=a.runtime == "openvino")
            return _timed(run_ray(jobs(f"ray{workers}"), opts))

        variants = {f"local ({a.threads} thread)": local, "ray, 1 worker": lambda: on_ray(1),
                    "ray, 2 workers": lambda: on_ray(2)}
        results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in variants}
        for _ in range(a.reps):
            for name, fn in variants.items():
                results[name].append(fn())
        ray.shutdown()
        print(f"{a.images} images {w}x{h}, x{a.scale}, {a.runtime}, medians of {a.reps} interleaved runs")
        print(f"{'engine':<20} {'run (img/s)':>12} {'wall (s)':>9} {'steady (img/s)':>15} {'failed':>7}")
        steady = {}
        for name, runs in results.items():
            wall = statistics.median(r[0] for r in runs)
            steady[name] = statistics.median(r[1] for r in runs)
            print(f"{name:<20} {a.images / wall:>12.2f} {wall:>9.1f} {steady[name]:>15.2f} {sum(r[2] for r in runs):>7}")
        eff = steady["ray, 2 workers"] / (2 * steady["ray, 1 worker"])
        print(f"scaling efficiency (steady, 2 workers vs 2 x 1 worker): {eff:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
