"""What the start-up and exit work of the `cadyq` program saves, and what the PNG zlib level costs.

    python bench/startup.py process IN.png [--runs 7] [--threads 2]
        Whole `cadyq upscale IN.png` processes, interleaved, medians (after two warm-up rounds that fill
        the compiled-graph cache and the prefetch marker):
        (a) `python -m cadyq_cli` (the program: OpenVINO imported without its model-conversion package, prefetch
            of the last graph, exit without teardown),
        (a1) the program after a whole `import openvino` (what the lean import and the one-thread OpenBLAS save:
            numpy, imported with OpenVINO, then starts its thread pool before the program can limit it),
        (b) the same with CADYQ_PREFETCH=0 (exit without teardown only),
        (c) `cli.main()` called by a plain script (neither: the interpreter's normal teardown).
        Prints seconds and ratios to (c).

    python bench/startup.py versions REV IN.png [--runs 9] [--threads 2]
        `python -m cadyq_cli upscale IN.png` of the code at git revision REV (`git archive`) against this tree's,
        both on this tree's weights, each with its own compiled-graph cache, interleaved, medians after two
        warm-up rounds; says whether the two outputs are the same bytes (or else the same pixels). What a
        series of commits changed in the code, whole process.

    python bench/startup.py png IMAGE.png [--runs 3]
        Encode time and file size of IMAGE (e.g. an x4 output) at zlib levels 1, 3, 4, 6 and 9: libpng through
        imagecodecs (as io.write_image writes PNGs) and Pillow's encoder, interleaved, medians; relative to
        Pillow at level 6 (its default).

    python bench/startup.py imports [--runs 5] [--threads 2]
        Whether two compiled graphs import faster on two threads than one after the other: the one-geometry
        graphs of a 240x320 and a 128x128 tile (shipped x4, compiled once and exported as the engine caches
        them), imported by `import_model` in fresh processes, sequentially and on two threads, interleaved.

    python bench/startup.py place [--runs 5]
        Placing a 1280x960 x4 tile output into the uint8 image in a fresh process (its memory touched for the first
        time): the OpenVINO engine's `_place` against clip, nan_to_num, rint and a transposed copy of whole arrays.

Run with nothing else on the machine: only ratios measured in one run mean anything.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _timing import interleaved  # noqa: E402


def _runner(cmd: list[str], env: dict[str, str], cwd: Path | None = None):  # noqa: ANN202
    """A function running ``cmd`` in ``env`` (and ``cwd``) once (SystemExit with its stderr if it fails)."""
    def run() -> None:
        res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return run


def versions(args: argparse.Namespace) -> None:
    """The program of git revision REV against this tree's, whole processes, interleaved."""
    work = Path(tempfile.mkdtemp(prefix="cadyq_versions_"))
    old = work / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    opts = ["--overwrite", "-q", "--threads", str(args.threads)]
    fns, outs = {}, {}
    for name, tree in ((args.rev, old), ("this tree", ROOT)):
        outs[name] = work / f"{len(outs)}.png"
        env = dict(os.environ, PYTHONPATH=str(tree), CADYQ_CACHE_DIR=str(work / f"cache{len(outs)}"),
                   CADYQ_WEIGHTS_DIR=str(ROOT / "weights"))
        # run inside the tree: `python -m` puts the working folder first on sys.path, before PYTHONPATH
        fns[name] = _runner([sys.executable, "-m", "cadyq_cli", "upscale", str(Path(args.input).resolve()),
                             str(outs[name]), *opts], env, cwd=tree)
    interleaved(fns, 2)
    times, med = interleaved(fns, args.runs)
    a, b = (outs[k].read_bytes() for k in fns)
    print(f"{Path(args.input).name}, whole `python -m cadyq_cli upscale` processes, median of {args.runs} (interleaved):")
    for k, v in med.items():
        print(f"  {k:12s} {v:6.3f} s  ({min(times[k]):.3f}-{max(times[k]):.3f})  {v / med[args.rev]:5.2f}x {args.rev}")
    if a == b:
        same = "identical"
    else:  # e.g. another PNG encoder: compare what the files decode to
        import numpy as np
        from imagecodecs import png_decode  # every bit depth as stored (Pillow reads 16-bit RGB as 8 bits)

        pa, pb = (png_decode(outs[k].read_bytes()) for k in fns)
        same = "other bytes, the same pixels" if np.array_equal(pa, pb) else "DIFFERENT pixels"
    print(f"  outputs: {same} ({len(a):,d} / {len(b):,d} bytes)")


def process(args: argparse.Namespace) -> None:
    """Whole processes of the three variants, interleaved."""
    py = sys.executable
    out = Path(tempfile.mkdtemp(prefix="cadyq_startup_"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    opts = ["--overwrite", "-q", "--threads", str(args.threads)]
    plain = "import sys; from cadyq_cli.cli import main; sys.argv[0] = 'cadyq'; main()"
    whole_ov = "import sys, openvino; from cadyq_cli.program import entry; sys.argv[0] = 'cadyq'; entry()"
    cmds = {
        "program": ([py, "-m", "cadyq_cli", "upscale", args.input, str(out / "a.png"), *opts], {}),
        "whole_ov": ([py, "-c", whole_ov, "upscale", args.input, str(out / "d.png"), *opts], {}),
        "no_prefetch": ([py, "-m", "cadyq_cli", "upscale", args.input, str(out / "b.png"), *opts], {"CADYQ_PREFETCH": "0"}),
        "plain_main": ([py, "-c", plain, "upscale", args.input, str(out / "c.png"), *opts], {}),
    }

    fns = {k: _runner(cmd, {**env, **extra}) for k, (cmd, extra) in cmds.items()}
    interleaved(fns, 2)
    times, med = interleaved(fns, args.runs)
    base = med["plain_main"]
    print(f"{Path(args.input).name}, whole `cadyq upscale` processes, median of {args.runs} (interleaved):")
    for k, v in med.items():
        print(f"  {k:12s} {v:6.3f} s  ({min(times[k]):.3f}-{max(times[k]):.3f})  {v / base:5.2f}x plain_main")


def png(args: argparse.Namespace) -> None:
    """Encode time and size per zlib level: the encoder io.write_image uses (libpng through imagecodecs) and
    Pillow's, interleaved."""
    import numpy as np
    from imagecodecs import png_encode
    from PIL import Image

    im = Image.open(args.input)
    if im.mode not in ("L", "LA", "RGB", "RGBA"):  # as io.write_image gets it: 8-bit gray or colour samples
        im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
    im.load()
    arr = np.asarray(im)
    encoders = {
        "libpng": lambda level: png_encode(arr, level=level),
        "Pillow": lambda level: _pillow_png(im, level),
    }
    rows: dict[tuple[str, int], tuple[float, int]] = {}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.runs):
        for level in (1, 3, 4, 6, 9):
            for name, enc in encoders.items():
                t = time.perf_counter()
                size = len(enc(level))
                times.setdefault((name, level), []).append(time.perf_counter() - t)
                rows[(name, level)] = (0.0, size)
    rows = {k: (statistics.median(times[k]), size) for k, (_, size) in rows.items()}
    ref_t, ref_size = rows[("Pillow", 6)]
    print(f"{Path(args.input).name} {im.size[0]}x{im.size[1]}, PNG encode, median of {args.runs} (interleaved); "
          "relative to Pillow at level 6 (its default):")
    for (name, level), (t, size) in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  {name:7s} level {level}: {t:6.3f} s ({t / ref_t:4.2f}x)  {size:>10,d} bytes  "
              f"{100 * (size / ref_size - 1):+5.1f} %")


def _pillow_png(im: object, level: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=level)  # type: ignore[attr-defined]
    return buf.getvalue()


def _child_times(code: str, modes: tuple[str, ...], runs: int, before: tuple[str, ...] = (),
                 after: tuple[str, ...] = ()) -> dict[str, list[float]]:
    """Seconds ``python -c code *before MODE *after`` prints, per mode: fresh processes, modes interleaved, after
    one untimed round (file cache)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(runs + 1):
        for mode in modes:
            res = subprocess.run([sys.executable, "-c", code, *before, mode, *after], capture_output=True, text=True,
                                 cwd=ROOT, env=env)
            if res.returncode:
                raise SystemExit(res.stderr[-2000:])
            if r:
                times[mode].append(float(res.stdout.split()[-1]))
    return times


IMPORT_CHILD = r"""
import sys, threading, time
sys.modules["openvino.tools.ovc"] = None  # as the program imports it
import openvino as ov
from cadyq_cli.runtime.engine import GRAPH_CONFIG
threads, mode, blobs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
cfg = {**GRAPH_CONFIG, "INFERENCE_NUM_THREADS": threads}
data = [open(b, "rb").read() for b in blobs]
core = ov.Core()
t = time.perf_counter()
if mode == "sequential":
    for d in data:
        core.import_model(d, "CPU", cfg)
else:
    ts = [threading.Thread(target=core.import_model, args=(d, "CPU", cfg)) for d in data]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
print(time.perf_counter() - t)
"""


def imports(args: argparse.Namespace) -> None:
    """Two graph imports: one after the other against two threads at once."""
    import openvino as ov

    import cadyq_cli.runtime.ov_graph as E
    from cadyq_cli.runtime.ov_edsr import read_edsr
    from cadyq_cli.runtime.engine import GRAPH_CONFIG

    work = Path(tempfile.mkdtemp(prefix="cadyq_imports_"))
    wts = read_edsr(ROOT / "weights" / "edsr-baseline-x4.safetensors")
    cfg = {**GRAPH_CONFIG, "INFERENCE_NUM_THREADS": args.threads}
    blobs = []
    for h, w in ((240, 320), (128, 128)):
        geo = E.Geometry(h, w, 96, 0, 0)
        cm = ov.Core().compile_model(E.build_body(wts, geo.layout(), geo=geo, with_tail=True), "CPU", cfg)
        buf = io.BytesIO()
        cm.export_model(buf)
        blobs.append(work / f"{h}x{w}.blob")
        blobs[-1].write_bytes(buf.getvalue())
    times = _child_times(IMPORT_CHILD, ("sequential", "two threads"), args.runs, (str(args.threads),),
                         tuple(map(str, blobs)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"import_model of the 240x320 and 128x128 graphs in fresh processes, median of {args.runs} (interleaved):")
    for k, v in med.items():
        print(f"  {k:12s} {v:6.3f} s  ({min(times[k]):.3f}-{max(times[k]):.3f})  {v / med['sequential']:5.2f}x")


PLACE_CHILD = r"""
import sys, time
import numpy as np
from cadyq_cli.runtime.engine import _place
sr = (np.random.default_rng(0).standard_normal((3, 960, 1280), dtype=np.float32) * 80 + 128)
out = np.empty((960, 1280, 3), np.uint8)
t = time.perf_counter()
if sys.argv[1] == "whole arrays":
    out[:] = np.rint(np.nan_to_num(np.clip(sr, 0, 255), nan=0.0)).transpose(1, 2, 0)
else:
    _place(sr, out)
print(time.perf_counter() - t)
"""


def place(args: argparse.Namespace) -> None:
    """Tile placement, cold: row blocks through one buffer against whole-array temporaries."""
    times = _child_times(PLACE_CHILD, ("whole arrays", "_place"), args.runs)
    print(f"placing a 1280x960 tile output in a fresh process, median of {args.runs} (interleaved):")
    for k, v in times.items():
        print(f"  {k:12s} {1000 * statistics.median(v):6.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("process")
    a.add_argument("input")
    a.add_argument("--runs", type=int, default=7)
    a.add_argument("--threads", type=int, default=2)
    a.set_defaults(fn=process)
    v = sub.add_parser("versions")
    v.add_argument("rev")
    v.add_argument("input")
    v.add_argument("--runs", type=int, default=9)
    v.add_argument("--threads", type=int, default=2)
    v.set_defaults(fn=versions)
    m = sub.add_parser("imports")
    m.add_argument("--runs", type=int, default=5)
    m.add_argument("--threads", type=int, default=2)
    m.set_defaults(fn=imports)
    q = sub.add_parser("place")
    q.add_argument("--runs", type=int, default=5)
    q.set_defaults(fn=place)
    b = sub.add_parser("png")
    b.add_argument("input")
    b.add_argument("--runs", type=int, default=3)
    b.set_defaults(fn=png)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
