"""The numpy engine of ``--kernels openvino``: tiles -> compiled OpenVINO graphs (body, then the tail in row
strips) -> stitch -> report.

Same tiling plans, bits, report and output conventions as :func:`cadyq_cli.engine.upscale_array`
(tiles run one at a time). The graphs take any tile size: a tile's place on the region lattice comes in
as inputs, so one compiled body graph per layout (:meth:`~cadyq_cli.runtime.ov_graph.Geometry.layout`:
how region boundaries cut the tile) and one tail serve every image. They are exported to a cache folder
(``$CADYQ_CACHE_DIR/openvino``, default ``~/.cache/cadyq/openvino``) keyed by the weights' sha256, the
graph, the mode and the OpenVINO version, so a later process imports the compiled blob instead of
building and compiling the graph again. The cache keeps the most recently used graphs within
``$CADYQ_CACHE_MAX_MB`` (default 2048).
"""
from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from contextlib import suppress
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CadyqError
from ..report import ImageReport, RegionBits, build_report
from ..samples import round_into
from ..tiling import TilingConfig, plan_tiles
from . import prefetch
from .cache import CACHE_MAX_BYTES, MAX_SEEN, cache_dir, cache_max_bytes, trim_cache
from .ov_carn import carn_weights
from .ov_edsr import edsr_weights
from .ov_graph import FP_LAYERS, Geometry, NetWeights, bits_from_idx, build_body, build_tail, read_safetensors, tail_strips

__all__ = ["OVModel", "load_openvino_model", "read_weights", "openvino_available", "cache_dir", "cache_max_bytes", "trim_cache",
           "CACHE_MAX_BYTES", "ARCHS"]

#: the networks this runtime runs (the PyTorch models' ``arch``), and how it reads their weights
_READERS: dict[str, Callable[..., NetWeights]] = {
    "edsr_baseline": lambda sd, meta, sha, scale: edsr_weights(sd, meta, sha),
    "carn": lambda sd, meta, sha, scale: carn_weights(sd, meta, sha, scale or int(meta.get("scale", 4))),
}
ARCHS = tuple(_READERS)
MODES = ("dynamic", "fp32")
#: body graphs kept alive at a time, besides the tail graph (see OVModel._compiled)
MAX_COMPILED = 2
#: largest tile (LR px) that runs on a body graph of free size: that graph plans its memory per inference and
#: takes more of it (a 320x240 process: 1.4 GB against 0.55 GB), so bigger tiles always get their own graph
DYNAMIC_MAX_PIXELS = 320 * 240
#: compile settings: FP32 for the full-precision layers, one stream; no "snippets" (OpenVINO's JIT-fused
#: elementwise subgraphs): the CADyQ graph has ~400 of them, each compiled again when a cached graph is
#: imported, which doubled the import time (0.61 -> 0.30 s at 128x128) for no faster inference
GRAPH_CONFIG: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                                   "SNIPPETS_MODE": "DISABLE"}


def openvino_available() -> bool:
    """True when the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def free_size_graphs() -> bool:
    """Whether a tile seen for the first time may run on a body graph of free size (default; ``CADYQ_FREE_SIZE=0``:
    every geometry compiles its own graph at once, the runtime before graphs of free size: for benchmarks)."""
    return os.environ.get("CADYQ_FREE_SIZE", "") != "0"


class OVModel:
    """EDSR-baseline or CARN CADyQ (``dynamic``) or its FP32 network (``fp32``) on OpenVINO's CPU plugin.

    Args:
        wts: the weights (:class:`~cadyq_cli.runtime.ov_edsr.EdsrWeights` or
            :class:`~cadyq_cli.runtime.ov_carn.CarnWeights`, at the scale to run).
        mode: ``dynamic`` or ``fp32``.
        fp_layers: ``fp32`` (default) or ``bf16`` (the upsampling tail in bf16, as ``--fp-layers bf16``).
        int8: quantized convs as exact int8 convolutions (default: where the CPU has an int8 dot product;
            elsewhere OpenVINO's int8 kernels saturate), else as the float reference computes them.
        threads: CPU threads for inference (0: OpenVINO's default).
        cache: export compiled graphs to :func:`cache_dir` and import them from there.
    """

    def __init__(self, wts: NetWeights, mode: str = "dynamic", threads: int = 0, cache: bool = True,
                 fp_layers: str = "fp32", int8: bool | None = None) -> None:
        import openvino as ov

        from ..devices import cpu_has_int8_dot

        if mode not in MODES:
            raise CadyqError(f"--kernels openvino runs --mode dynamic or fp32, not {mode}")
        if fp_layers not in FP_LAYERS:
            raise CadyqError(f"--fp-layers takes {' or '.join(FP_LAYERS)}, not {fp_layers}")
        self.wts, self.mode, self.cache, self.fp_layers = wts, mode, cache, fp_layers
        self.int8 = cpu_has_int8_dot() if int8 is None else int8
        #: how this runtime runs quantized convs, whatever the mode: int8 codes on OpenVINO, or the reference's float
        #: arithmetic on OpenVINO
        self.quant_kernels = "openvino" if self.int8 else "openvino-float"
        #: the report's ``kernels`` (the fp32 graph has no quantized conv: "float")
        self.kernels = "float" if mode == "fp32" else self.quant_kernels
        self.scale, self.arch, self.receptive_radius = wts.scale, wts.arch, wts.receptive_radius
        self.n_selectors = wts.n_selectors if mode == "dynamic" else 0
        self.core = ov.Core()
        self.version = ov.get_version()
        self.config: dict[str, object] = dict(GRAPH_CONFIG)
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        #: the compiled graphs last used (the tail, and at most MAX_COMPILED bodies), with one inference request
        #: each: a compiled graph holds the working memory of its last tile (every geometry of a big image alive
        #: took 12 GB)
        self._compiled: OrderedDict[str, tuple[object, object]] = OrderedDict()
        #: (seconds, "compiled" | "imported") per graph prepared by this object: "tail", "body-<layout>" (any
        #: tile size) or "static-<layout>-<geometry>" (one tile geometry)
        self.prepare_log: dict[str, tuple[float, str]] = {}
        self._geos: dict[str, Geometry] = {}
        self._seen: dict[str, int] = {}

    def _blob_path(self, kind: str) -> Path | None:
        folder = cache_dir()
        if folder is None:
            return None
        what = {"tail": f"{kind}-{self.fp_layers}", "static": f"{kind}-{self.kernels}-{self.fp_layers}"}.get(
            kind.split("-")[0], f"{kind}-{self.kernels}")
        # one multi-scale file (CARN): graphs without the tail serve every scale, so they are cached once
        at = "any" if self.wts.multi_scale and kind.split("-")[0] in ("body", "staticbits") else f"x{self.scale}"
        key = f"{self.wts.describe()}|{at}|{what}|{self.version}|{sorted(self.config.items())}"
        return folder / f"{self.wts.cache_name or self.arch}-{at}-{what}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.blob"

    def _build(self, kind: str) -> object:
        if kind == "tail":
            return build_tail(self.wts, self.fp_layers)
        if kind.startswith("static"):
            geo = self._geos[kind]
            return build_body(self.wts, geo.layout(self.mode == "dynamic", self.int8), self.int8, geo,
                              with_tail=kind.startswith("static-"), fp_layers=self.fp_layers,
                              bits_only=kind.startswith("staticbits-"))
        return build_body(self.wts, kind.removeprefix("body-"), self.int8)

    def body_kind(self, geo: Geometry, bits_only: bool = False, repeats: bool = False) -> str:
        """The graph a tile of ``geo`` runs on: ``body-<layout>`` (then the tail graph) takes any tile size,
        ``static-<layout>-<geometry>`` (the tail inside; ``staticbits-...`` without it, for ``bits_only``) one
        geometry. The latter runs faster (static shapes: a 320x240 body 0.75 s against 1.4 s here) but costs
        a compile (2-4 s) the first time: a geometry gets its own graph when one is cached, when it comes a
        second time (in this process, or in any, by a marker file in the cache; ``repeats``: more tiles of the
        image have it), or when the tile is bigger than DYNAMIC_MAX_PIXELS, so that a folder of small images
        of many sizes compiles nothing per size and a size that recurs runs at full speed. Both give the same
        bytes: the same operations on the same kernels (tests/openvino_checks.py checks it)."""
        layout = geo.layout(self.mode == "dynamic", self.int8)
        kind = f"{'staticbits' if bits_only else 'static'}-{layout}-{geo.key()}"
        if kind in self._compiled:
            return kind
        if len(self._geos) > MAX_SEEN:  # a long run over many sizes: forget the oldest
            self._geos.clear()
            self._seen.clear()
        self._geos[kind] = geo
        path = self._blob_path(kind) if self.cache else None
        mark = None if path is None else path.with_suffix(".seen")

        def exists(p: Path | None) -> bool:
            with suppress(OSError):  # a cache folder that cannot be searched is no cache
                return p is not None and p.is_file()
            return False

        if repeats or exists(path) or geo.h * geo.w > DYNAMIC_MAX_PIXELS or not free_size_graphs():
            return kind
        self._seen[kind] = self._seen.get(kind, 0) + 1
        if self._seen[kind] > 1 or exists(mark):
            return kind
        if mark is not None:
            with suppress(OSError):
                mark.parent.mkdir(parents=True, exist_ok=True)
                mark.touch()
                trim_cache(mark.parent, 0)
        return "body-" + layout

    def compiled(self, kind: str) -> tuple[object, object]:
        """(compiled graph, its inference request) of ``kind``: ``tail``, or ``body-<layout>``; imported from
        the cache, or built, compiled and exported."""
        if kind in self._compiled:
            self._compiled.move_to_end(kind)
            return self._compiled[kind]
        t0 = time.perf_counter()
        path = self._blob_path(kind) if self.cache else None
        # imported on another thread while the program was starting (runtime/prefetch.py), when it guessed this
        # graph; the first body graph asked for ends the prefetch either way
        cm = prefetch.take(path, self.config) if kind != "tail" and path is not None else None
        how = "prefetched"
        if cm is None and path is not None and path.is_file():
            try:
                cm = self.core.import_model(path.read_bytes(), "CPU", self.config)
                how = "imported"
            except Exception:  # noqa: BLE001 - a stale or damaged blob: compile again
                cm = None
        if cm is not None and path is not None:
            with suppress(OSError):  # recently used: the last to go when the cache is trimmed
                os.utime(path)
        if cm is None:
            cm = self.core.compile_model(self._build(kind), "CPU", self.config)
            how = "compiled"
            if path is not None:  # an unwritable cache means no cache, never a failed image
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    import io

                    buf = io.BytesIO()
                    cm.export_model(buf)
                    tmp.write_bytes(buf.getvalue())
                    os.replace(tmp, path)
                    with suppress(OSError):
                        path.with_suffix(".seen").unlink(missing_ok=True)
                    trim_cache(path.parent, cache_max_bytes(), keep=path)
                except Exception:  # noqa: BLE001 - export_model raises RuntimeError too: no cache, not a failure
                    with suppress(OSError):  # no cache: the next process compiles again
                        tmp.unlink()
        while kind != "tail" and sum(k != "tail" for k in self._compiled) >= MAX_COMPILED:
            del self._compiled[next(k for k in self._compiled if k != "tail")]  # the least recently used body
        self._compiled[kind] = (cm, cm.create_infer_request())
        self.prepare_log[kind] = (time.perf_counter() - t0, how)
        if kind != "tail" and path is not None and path.is_file():
            prefetch.remember(path, self.config)  # the graph the next process starts importing at once
        return self._compiled[kind]

    def forward(self, x: np.ndarray, geo: Geometry, bits_only: bool = False,
                repeats: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
        """(sr (1, 3, sH, sW), bits (1, n_sel, nh, nw)) of one tile x (1, 3, H, W) float32 0..255; sr is None
        with ``bits_only`` (the tail does not run); ``repeats``: other tiles of the image have this geometry."""
        kind = self.body_kind(geo, bits_only, repeats)
        cm, req = self.compiled(kind)
        feeds = {"x": np.ascontiguousarray(x, dtype=np.float32)}
        if kind.startswith("body-"):
            feeds.update(geo.inputs(kind.removeprefix("body-")))
        res = req.infer(feeds)
        bits = bits_from_idx(res[cm.output("idx")]) if self.n_selectors else np.zeros((1, 0, 1, 1), np.float32)
        if bits_only:
            return None, bits
        if kind.startswith("static-"):
            return res[cm.output("sr")], bits
        r = res[cm.output("r")]
        cm, req = self.compiled("tail")
        s, (_, c, h, w) = self.scale, r.shape
        parts = []
        for a, b, y0, y1 in tail_strips(h, w, c, s):
            sr = req.infer({"r": np.ascontiguousarray(r[:, :, a:b])})[cm.output("sr")]
            parts.append(sr[:, :, (y0 - a) * s:(y1 - a) * s])
        return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)), bits

    def _geometry(self, tile: object, region: int | None) -> Geometry:
        """The geometry of a planned tile (its size and place on the region lattice); a tile inside one region,
        and any tile in fp32 mode, has the geometry of its size alone (one region)."""
        y0, y1, x0, x1 = tile.in_box  # type: ignore[attr-defined]
        h, w = y1 - y0, x1 - x0
        if region is None or self.mode == "fp32":
            return Geometry(h, w)
        pt, pl = y0 % region, x0 % region
        if pt + h <= region and pl + w <= region:
            return Geometry(h, w)
        return Geometry(h, w, region, pt, pl)

    def upscale_array(self, rgb: np.ndarray, cfg: TilingConfig = TilingConfig(),
                      progress: Callable[[int, int], None] | None = None,
                      out_dtype: str = "float32", bits_only: bool = False) -> tuple[np.ndarray | None, ImageReport]:
        """Super-resolve one image; the contract of :func:`cadyq_cli.engine.upscale_array` (``bits_only``: the
        report alone, from the graph without the layers after the last selector; the image is None)."""
        if bits_only and self.mode != "dynamic":
            raise CadyqError("the OpenVINO runtime selects bits in --mode dynamic only")
        if out_dtype not in ("float32", "uint8"):
            raise ValueError(f"out_dtype must be 'float32' or 'uint8', got {out_dtype!r}")
        cfg.validate(quantized=self.mode == "dynamic")
        t0 = time.perf_counter()
        h, w = rgb.shape[:2]
        s = self.scale
        tiles, region = plan_tiles(h, w, s, cfg, self.receptive_radius)
        out = None if bits_only else np.empty((h * s, w * s, 3), dtype=out_dtype)
        regions = RegionBits(h, w, region)
        # tiles of one layout and geometry one after another: each body graph is prepared once per image (tiles
        # are independent)
        how = self.mode == "dynamic", self.int8
        order = sorted(range(len(tiles)), key=lambda k: (self._geometry(tiles[k], region).layout(*how),
                                                         self._geometry(tiles[k], region).key()))
        count = Counter(self._geometry(t, region) for t in tiles)
        for i, t in enumerate(tiles[k] for k in order):
            y0, y1, x0, x1 = t.in_box
            geo = self._geometry(t, region)
            sr, bits = self.forward(rgb[y0:y1, x0:x1].transpose(2, 0, 1)[None], geo, bits_only, count[geo] > 1)
            if out is not None and sr is not None:
                oy0, oy1, ox0, ox1 = t.out_box
                _place(sr[0, :, t.src_y : t.src_y + oy1 - oy0, t.src_x : t.src_x + ox1 - ox0], out[oy0:oy1, ox0:ox1])
            regions.add_tile(t, bits[0])
            if progress is not None:
                progress(i + 1, len(tiles))
        table = self.wts.cost_table()
        report = build_report(regions, self.n_selectors, s, table, self.mode, self.mode == "dynamic", None, cfg.tiling,
                              time.perf_counter() - t0, kernels=self.kernels, fp_layers=self.fp_layers)
        return out, report


def _place(part: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Write a tile's SR core ``part`` (3, h, w) float32 into ``dst`` (h, w, 3), clamped to [0, 255]; a uint8
    ``dst`` gets it rounded half to even with NaN as 0 (as the PyTorch engine), channel by channel through
    :func:`~cadyq_cli.samples.round_into`: a 1280x960 output in 5.5 ms instead of 24 ms for whole-array
    temporaries (``python bench/startup.py place``)."""
    for c in range(part.shape[0]):
        if dst.dtype != np.uint8:
            np.clip(part[c], 0, 255, out=dst[:, :, c])
        else:
            round_into(part[c], dst[:, :, c], 255)
    return dst


def read_weights(path: str | Path, scale: int | None) -> NetWeights:
    """The weights of an EDSR-baseline or CARN safetensors file (by its ``arch`` metadata), at ``scale`` (a CARN file
    serves each of its upsamplers' scales; None: the file's own). The file is read once.

    Raises:
        ValueError: not such a file, or not for ``scale``.
    """
    sd, meta, sha = read_safetensors(path)
    arch = meta.get("arch", "edsr_baseline")
    if arch not in _READERS:
        raise ValueError(f"the runtime runs {' or '.join(ARCHS)} weights, not {arch}")
    wts = _READERS[arch](sd, meta, sha, scale)
    if scale is not None and wts.scale != scale:
        raise ValueError(f"the weights are for x{wts.scale}, not x{scale}")
    return wts


def load_openvino_model(model: str | None = None, weights: str | Path | None = None, scale: int | None = 4,
                        mode: str = "dynamic", threads: int = 0, cache: bool = True, fp_layers: str = "fp32",
                        int8: bool | None = None) -> OVModel:
    """Load a shipped EDSR-baseline or CARN model (or such a safetensors file) for the OpenVINO runtime.

    Raises:
        CadyqError: openvino is not installed, the model is neither, or the mode is not supported.
    """
    if not openvino_available():
        raise CadyqError("--kernels openvino needs the openvino package (pip install openvino)")
    from ..weights import DEFAULT_MODEL, resolve_weights, shipped_path

    cfg = None
    if weights is None:
        cfg = resolve_weights(model or DEFAULT_MODEL, scale)
        if cfg.arch not in ARCHS:
            raise CadyqError(f"--kernels openvino runs the EDSR-baseline and CARN models only, not {cfg.name}")
        path = cfg.path
    else:
        path = Path(weights)
        if path.suffix != ".safetensors" or not path.is_file():
            raise CadyqError(f"{path}: --kernels openvino reads EDSR-baseline or CARN .safetensors files only")
    try:
        wts = read_weights(path, scale)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        if cfg is not None:
            shipped_path(cfg)  # a missing or damaged shipped file says so (and to reinstall)
        raise CadyqError(f"{path}: cannot run on OpenVINO ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if cfg is not None:
        shipped_path(cfg, wts.sha256)  # the manifest's digest, checked on the bytes read (the file is read once)
    return OVModel(wts, mode, threads, cache, fp_layers, int8)
