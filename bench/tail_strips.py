"""What the OpenVINO tail's strip budget costs: the first inference (page faults) against the steady one.

    python bench/tail_strips.py [--size 240x320] [--budgets 256:3,128:2,96:2] [--rounds 4] [--threads 2]

For each ``MB:halo`` the compiled graph of one 240x320 tile (head, body and tail in strips, as the engine
compiles a repeated geometry) is built with ``ov_graph.TAIL_BUDGET_BYTES = MB`` and ``TAIL_HALO = halo`` in a
fresh process (the first inference pays for touching its working memory), then timed: first inference, page
faults during it, median of three more, peak RSS. Rounds interleave the budgets; medians are printed.
Weights: the shipped edsr-baseline-x4. Run with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
import numpy as np, openvino as ov
import cadyq_cli.runtime.ov_edsr as D
import cadyq_cli.runtime.ov_graph as E
from cadyq_cli.runtime.engine import GRAPH_CONFIG
mb, halo, h, w, threads = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
E.TAIL_BUDGET_BYTES, E.TAIL_HALO = int(mb * (1 << 20)), halo
wts = D.read_edsr(sys.argv[6])
geo = E.Geometry(h, w, 96, 0, 0)
cfg = {**GRAPH_CONFIG, "INFERENCE_NUM_THREADS": threads}  # as the engine compiles it
cm = ov.Core().compile_model(E.build_body(wts, geo.layout(), geo=geo, with_tail=True), "CPU", cfg)
x = np.random.default_rng(0).uniform(0, 255, (1, 3, h, w)).astype(np.float32)
rq = cm.create_infer_request()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = time.perf_counter(); rq.infer([x]); first = time.perf_counter() - t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
steady = []
for _ in range(3):
    t = time.perf_counter(); rq.infer([x]); steady.append(time.perf_counter() - t)
print(json.dumps({"strips": len(E.tail_strips(h, w, wts.n_feats, wts.scale)), "first": first, "faults": faults,
                  "steady": sorted(steady)[1], "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    """Run the rounds and print the medians per budget."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="240x320", help="tile HxW (LR px)")
    p.add_argument("--budgets", default="256:3,128:2,96:2", help="comma list of MB:halo")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    h, w = (int(v) for v in a.size.split("x"))
    budgets = [tuple(b.split(":")) for b in a.budgets.split(",")]
    weights = str(ROOT / "weights" / "edsr-baseline-x4.safetensors")
    runs: dict[tuple[str, str], list[dict]] = {b: [] for b in budgets}
    for _ in range(a.rounds):
        for mb, halo in budgets:
            res = subprocess.run([sys.executable, "-c", CHILD, mb, halo, str(h), str(w), str(a.threads), weights],
                                 capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                raise SystemExit(res.stderr[-2000:])
            runs[(mb, halo)].append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{h}x{w} tile, x4, medians of {a.rounds} fresh processes:")
    for (mb, halo), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("first", "faults", "steady", "peak_mb")}
        print(f"  {mb:>4} MB, halo {halo}: {rs[0]['strips']:2d} strips  first {med['first']:.3f} s  "
              f"({med['faults']:.0f} page faults)  steady {med['steady']:.3f} s  peak {med['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
