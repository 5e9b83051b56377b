"""CADyQ against a plain FP32 peer: whole processes, or forward passes, side by side.

    python bench/peers.py compare IN.png [IN.png ...] [--scale 4] [--runs 5] [--threads N]
        Whole processes (read PNG, upscale, write PNG), interleaved, medians of --runs after two
        warm-up rounds each (they fill the compiled-graph cache: an image size seen twice gets its own graph):
        (a) OpenVINO FP32 plain EDSR-baseline of the same weights (bench/peer_openvino_fp32.py), its PNG
        written at Pillow's default zlib level 6, and (a4) the same at level 4 (cadyq's default) with one OpenBLAS
        thread (OPENBLAS_NUM_THREADS=1, as the `cadyq` program sets for itself: numpy's pool spins at import),
        (b) `cadyq upscale` (default: the OpenVINO runtime for a shipped EDSR-baseline model; PNG level 4),
        (b6) `cadyq upscale --png-level 6` (the peer's encoder settings),
        (c) `CADYQ_KERNELS=torch cadyq upscale` (the PyTorch engine, int8 kernels),
        (e) `cadyq upscale --fp-layers bf16` (the default engine with a bf16 upsampling tail),
        (f) `cadyq upscale --model carn` (the shipped CARN: the OpenVINO runtime), (f-torch) the same on the
        PyTorch engine (CADYQ_KERNELS=torch), (f-peer) OpenVINO FP32 plain CARN of the same weights (CARN's own
        peer, PNG level 4 with one OpenBLAS thread, as cadyq writes it),
        (d) ONNX Runtime FP32 plain EDSR-baseline of the same weights (bench/peer_onnxruntime_fp32.py,
        PNG level 6; when onnxruntime + onnx import: `pip install cadyq[bench]`).
        Prints seconds and ratios to (a), and (b) to (a4): the same network work, encoder and BLAS setting.

    python bench/peers.py sizes IN.png [--count 6] [--runs 3]
        `cadyq upscale FOLDER` on a folder of --count crops of IN.png of distinct sizes (up to 320x240), each
        new to an empty compiled-graph cache: the default (a size seen once runs on a graph of free size)
        against CADYQ_FREE_SIZE=0 (every size compiles its own graph), whole processes, interleaved.

    python bench/peers.py forward IN.png [--scale 4] [--runs 5] [--profile]
        In one process: graph sizes, compile/import times, then interleaved forward medians of the
        OpenVINO FP32 graph, the CADyQ OpenVINO graph, the ONNX Runtime FP32 session (when onnxruntime
        + onnx import) and (without --no-torch) the PyTorch default engine; --profile adds the CADyQ
        graph's time by node type (OpenVINO PERF_COUNT).

The machine may be shared with other jobs: only ratios measured in the same run mean anything.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _timing import interleaved  # noqa: E402


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _weights(scale: int) -> Path:
    from cadyq_cli.weights import resolve_weights

    return resolve_weights("edsr-baseline", scale).path


def _has_ort() -> bool:
    """ONNX Runtime row (bench/peer_onnxruntime_fp32.py): when onnxruntime and onnx import."""
    code = "import onnxruntime, onnx"
    return subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True).returncode == 0


def compare(args: argparse.Namespace) -> None:
    """Whole-process timings, interleaved."""
    py = sys.executable
    wts = str(_weights(args.scale))
    thr = ["--threads", str(args.threads)] if args.threads else []
    out = Path(tempfile.mkdtemp(prefix="cadyq_peers_"))
    for inp in args.inputs:
        cmds = {
            "openvino_fp32": [py, str(ROOT / "bench/peer_openvino_fp32.py"), wts, inp, str(out / "a.png"), *thr],
            "openvino_fp32_png4": ["env", "OPENBLAS_NUM_THREADS=1", py, str(ROOT / "bench/peer_openvino_fp32.py"), wts,
                                   inp, str(out / "a4.png"), "--png-level", "4", *thr],
            "cadyq_default": [py, "-m", "cadyq_cli", "upscale", inp, str(out / "b.png"), "--scale", str(args.scale),
                              "--overwrite", "-q", *thr],
            "cadyq_png6": [py, "-m", "cadyq_cli", "upscale", inp, str(out / "b6.png"), "--scale", str(args.scale),
                           "--overwrite", "-q", "--png-level", "6", *thr],
            "cadyq_torch": ["env", "CADYQ_KERNELS=torch", py, "-m", "cadyq_cli", "upscale", inp, str(out / "c.png"),
                            "--scale", str(args.scale), "--overwrite", "-q", *thr],
            "cadyq_bf16_tail": [py, "-m", "cadyq_cli", "upscale", inp, str(out / "e.png"), "--scale", str(args.scale),
                                "--overwrite", "-q", "--fp-layers", "bf16", *thr],
            "cadyq_carn": [py, "-m", "cadyq_cli", "upscale", inp, str(out / "f.png"), "--scale", str(args.scale),
                           "--model", "carn", "--overwrite", "-q", *thr],
            "cadyq_carn_torch": ["env", "CADYQ_KERNELS=torch", py, "-m", "cadyq_cli", "upscale", inp, str(out / "g.png"),
                                 "--scale", str(args.scale), "--model", "carn", "--overwrite", "-q", *thr],
            "openvino_fp32_carn": ["env", "OPENBLAS_NUM_THREADS=1", py, str(ROOT / "bench/peer_openvino_fp32.py"),
                                   str(ROOT / "weights" / "carn.safetensors"), inp, str(out / "h.png"), "--png-level", "4",
                                   "--scale", str(args.scale), *thr],
        }
        if _has_ort():
            cmds["onnxruntime_fp32"] = [py, str(ROOT / "bench/peer_onnxruntime_fp32.py"), wts, inp, str(out / "d.png"), *thr]

        def runner(cmd: list[str]):  # noqa: ANN202
            def run() -> None:
                res = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
            return run

        fns = {k: runner(v) for k, v in cmds.items()}
        interleaved(fns, 2)  # warm-up: OS file cache, compiled-graph cache (an image size seen twice gets its graph)
        times, med = interleaved(fns, args.runs)
        from PIL import Image

        w, h = Image.open(inp).size
        print(f"{Path(inp).name} {w}x{h} x{args.scale}, whole process, median of {args.runs} (interleaved):")
        base = med["openvino_fp32"]
        for k, v in med.items():
            spread = f"{min(times[k]):.2f}-{max(times[k]):.2f}"
            print(f"  {k:18s} {v:6.2f} s  ({spread})  {v / base:5.2f}x openvino_fp32")
        same = med["cadyq_default"] / med["openvino_fp32_png4"]
        print(f"  cadyq_default / openvino_fp32_png4 (both PNGs at level 4, one OpenBLAS thread): {same:.2f}x")
        print(f"  cadyq_carn / cadyq_default (both on OpenVINO): {med['cadyq_carn'] / med['cadyq_default']:.2f}x, "
              f"cadyq_carn_torch / cadyq_torch (both on PyTorch): {med['cadyq_carn_torch'] / med['cadyq_torch']:.2f}x, "
              f"cadyq_carn_torch / cadyq_carn: {med['cadyq_carn_torch'] / med['cadyq_carn']:.2f}x")
        print(f"  cadyq_carn / openvino_fp32_carn (CARN against its own FP32 peer, PNG level 4 both): "
              f"{med['cadyq_carn'] / med['openvino_fp32_carn']:.2f}x")


def sizes(args: argparse.Namespace) -> None:
    """A folder of images of as many sizes, each new to the compiled-graph cache: whole processes, interleaved."""
    from PIL import Image

    py = sys.executable
    thr = ["--threads", str(args.threads)] if args.threads else []
    work = Path(tempfile.mkdtemp(prefix="cadyq_sizes_"))
    src = Image.open(args.inputs[0]).convert("RGB")
    folder = work / "in"
    folder.mkdir()
    for k in range(args.count):  # crops of distinct sizes, up to 320x240
        w, h = min(src.width, 200 + 24 * k), min(src.height, 150 + 18 * k)
        src.crop((0, 0, w, h)).save(folder / f"{k:02d}_{w}x{h}.png")
    n = 0

    def runner(env: dict[str, str]):  # noqa: ANN202
        def run() -> None:
            nonlocal n
            n += 1
            cmd = [py, "-m", "cadyq_cli", "upscale", str(folder), str(work / f"out{n}"), "--scale", str(args.scale),
                   "-q", *thr]
            res = subprocess.run(cmd, env=dict(_env(), CADYQ_CACHE_DIR=str(work / f"cache{n}"), **env),
                                 capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        return run

    fns = {"graphs_of_free_size": runner({}), "one_graph_per_size": runner({"CADYQ_FREE_SIZE": "0"})}
    interleaved(fns, 1)  # warm-up: OS file cache (each run starts from an empty compiled-graph cache)
    times, med = interleaved(fns, args.runs)
    print(f"{args.count} images of distinct sizes (crops of {Path(args.inputs[0]).name}) x{args.scale}, one process, "
          f"empty compiled-graph cache, median of {args.runs} (interleaved):")
    base = med["one_graph_per_size"]
    for k, v in med.items():
        print(f"  {k:20s} {v:6.2f} s  ({min(times[k]):.2f}-{max(times[k]):.2f})  {v / base:5.2f}x one_graph_per_size")


def forward(args: argparse.Namespace) -> None:
    """Forward-only timings in one process."""
    import openvino as ov
    from PIL import Image

    from cadyq_cli.runtime.engine import GRAPH_CONFIG, OVModel
    from cadyq_cli.runtime.ov_edsr import read_edsr
    from cadyq_cli.runtime.ov_graph import Geometry, build_body, build_network

    x = np.asarray(Image.open(args.inputs[0]).convert("RGB"), dtype=np.float32)
    h, w = x.shape[:2]
    xin = x.transpose(2, 0, 1)[None].copy()
    wts = read_edsr(_weights(args.scale))
    # the FP32 peer as bench/peer_openvino_fp32.py compiles it; the CADyQ graph as the runtime does
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    qconfig: dict[str, object] = dict(GRAPH_CONFIG)
    for c in (config, qconfig):
        if args.threads:
            c["INFERENCE_NUM_THREADS"] = args.threads
        if args.profile:
            c["PERF_COUNT"] = True
    core = ov.Core()
    geo = Geometry(h, w, 96, 0, 0) if max(h, w) <= 384 + 80 else None
    if geo is None:
        raise SystemExit("forward: use an image of at most 464 px (one tile)")
    t = time.perf_counter()
    fp_model = build_network(wts)  # as a plain export, for this image size
    fp_model.reshape({"x": [1, 3, h, w]})
    t_build_fp = time.perf_counter() - t
    t = time.perf_counter()
    q_model = build_body(wts, geo.layout(), geo=geo, with_tail=True)  # the graph of this one geometry
    t_build_q = time.perf_counter() - t
    t = time.perf_counter()
    fp = core.compile_model(fp_model, "CPU", config)
    t_fp = time.perf_counter() - t
    t = time.perf_counter()
    q = core.compile_model(q_model, "CPU", qconfig)
    t_q = time.perf_counter() - t
    import io

    buf = io.BytesIO()
    q.export_model(buf)
    t = time.perf_counter()
    core.import_model(buf.getvalue(), "CPU", qconfig)
    t_imp = time.perf_counter() - t
    print(f"{Path(args.inputs[0]).name} {w}x{h} x{args.scale}")
    print(f"  FP32 graph : {len(fp_model.get_ops())} ops, {len(fp.get_runtime_model().get_ops())} exec nodes, "
          f"build {t_build_fp:.2f} s, compile {t_fp:.2f} s")
    print(f"  CADyQ graph: {len(q_model.get_ops())} ops, {len(q.get_runtime_model().get_ops())} exec nodes, "
          f"build {t_build_q:.2f} s, compile {t_q:.2f} s, import of the exported blob {t_imp:.2f} s "
          f"({len(buf.getvalue()) / 1e6:.1f} MB)")
    rq, rf = q.create_infer_request(), fp.create_infer_request()
    variants = {"openvino_fp32": lambda: rf.infer([xin]), "openvino_cadyq": lambda: rq.infer([xin])}
    try:
        import onnx  # noqa: F401  (builds the .onnx when it is not cached)
        import onnxruntime  # noqa: F401
    except ImportError:
        print("  (no ONNX Runtime row: pip install cadyq[bench])")
    else:
        from peer_onnxruntime_fp32 import onnx_file, session

        t = time.perf_counter()
        onnx_file(_weights(args.scale))
        t_onnx = time.perf_counter() - t
        t = time.perf_counter()
        sess = session(_weights(args.scale), args.threads)
        t_sess = time.perf_counter() - t
        print(f"  ONNX Runtime FP32: .onnx from the cache or built {t_onnx:.2f} s, session {t_sess:.2f} s")
        variants["onnxruntime_fp32"] = lambda: sess.run(["sr"], {"x": xin})
    for fn in variants.values():  # first inference apart (allocations)
        t = time.perf_counter()
        fn()
    if not args.no_torch:
        from cadyq_cli.engine import upscale_array
        from cadyq_cli.weights import load_model

        net = load_model(scale=args.scale)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        variants["torch_default"] = lambda: upscale_array(net, x)
        variants["torch_default"]()
    ovm = OVModel(wts, threads=args.threads)
    variants["openvino_engine"] = lambda: ovm.upscale_array(x)
    for _ in range(2):  # an image size seen twice gets its own graph
        variants["openvino_engine"]()
    times, med = interleaved(variants, args.runs)
    base = med["openvino_fp32"]
    print(f"  forward, median of {args.runs} (interleaved):")
    for k, v in med.items():
        print(f"    {k:16s} {v:6.3f} s  ({min(times[k]):.3f}-{max(times[k]):.3f})  {v / base:5.2f}x openvino_fp32")
    if args.profile:
        rq.infer([xin])
        agg: dict[str, float] = defaultdict(float)
        cnt: dict[str, int] = defaultdict(int)
        for p in rq.profiling_info:
            key = f"{p.node_type}/{p.exec_type}"
            agg[key] += p.real_time.total_seconds()
            cnt[key] += 1
        total = sum(agg.values())
        print(f"  CADyQ graph by node type (one inference, {total:.3f} s):")
        for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:14]:
            print(f"    {k:40s} {v * 1000:8.1f} ms  {100 * v / total:5.1f} %  x{cnt[k]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["compare", "forward", "sizes"])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--count", type=int, default=6, help="sizes: images in the folder")
    args = p.parse_args()
    {"compare": compare, "forward": forward, "sizes": sizes}[args.what](args)


if __name__ == "__main__":
    main()
