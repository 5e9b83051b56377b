"""The numpy engine of ``--kernels openvino``: tiles -> compiled OpenVINO graph per tile geometry -> stitch -> report.

Same tiling plans, bits, report and output conventions as :func:`cadyq_cli.engine.upscale_array`
(tiles run one at a time). Compiled graphs are exported to a cache folder
(``$CADYQ_CACHE_DIR/openvino``, default ``~/.cache/cadyq/openvino``) keyed by the weights' sha256,
the tile geometry, the mode and the OpenVINO version, so a later process imports the compiled blob
instead of building and compiling the graph again. The cache keeps the most recently used graphs
within ``$CADYQ_CACHE_MAX_MB`` (default 2048).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import suppress
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..accounting import edsr_cost_table
from ..errors import CadyqError
from ..report import ImageReport, RegionBits, build_report
from ..tiling import TilingConfig, plan_tiles
from .ov_edsr import FP_LAYERS, EdsrWeights, Geometry, build_graph, describe, read_edsr

__all__ = ["OVModel", "load_openvino_model", "openvino_available", "cache_dir", "cache_max_bytes", "trim_cache",
           "RECEPTIVE_RADIUS"]

#: LR px of context a pixel depends on (as :attr:`cadyq_cli.models.edsr.EDSRBaseline.receptive_radius`)
RECEPTIVE_RADIUS = 40
MODES = ("dynamic", "fp32")
#: compiled graphs kept alive at a time (see OVModel._compiled)
MAX_COMPILED = 2
#: default size cap of the compiled-graph cache (see cache_max_bytes)
CACHE_MAX_BYTES = 2 << 30
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


def cache_dir() -> Path | None:
    """Folder of exported compiled graphs (None when no home folder can be found: no cache)."""
    base = os.environ.get("CADYQ_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    if not os.environ.get("CADYQ_CACHE_DIR"):
        try:
            base = os.path.join(base or Path.home() / ".cache", "cadyq")
        except RuntimeError:  # Path.home() without HOME or a passwd entry
            return None
    return Path(base) / "openvino"


def cache_max_bytes() -> int:
    """Size cap of the compiled-graph cache: ``$CADYQ_CACHE_MAX_MB`` (default 2048 MB; 0: no cap)."""
    raw = os.environ.get("CADYQ_CACHE_MAX_MB", "")
    try:
        return max(0, int(float(raw) * (1 << 20))) if raw.strip() else CACHE_MAX_BYTES
    except ValueError:
        return CACHE_MAX_BYTES


def trim_cache(folder: Path, max_bytes: int, keep: Path | None = None) -> None:
    """Delete the least recently used ``*.blob`` files of ``folder`` until they take at most ``max_bytes``
    (0: no cap); ``keep`` is never deleted. Every tile geometry has its own compiled graph (5-8 MB), so a
    folder of images of many sizes would otherwise fill the disk."""
    if max_bytes <= 0:
        return
    blobs = []
    for f in folder.glob("*.blob"):
        with suppress(OSError):
            st = f.stat()
            blobs.append((st.st_mtime, st.st_size, f))
    total = sum(b[1] for b in blobs)
    for _, size, f in sorted(blobs, key=lambda b: b[0]):
        if total <= max_bytes:
            break
        if keep is not None and f == keep:
            continue
        with suppress(OSError):
            f.unlink()
            total -= size


class OVModel:
    """EDSR-baseline CADyQ (``dynamic``) or its FP32 network (``fp32``) on OpenVINO's CPU plugin.

    Args:
        wts: the weights.
        mode: ``dynamic`` or ``fp32``.
        fp_layers: ``fp32`` (default) or ``bf16`` (the upsampling tail in bf16, as ``--fp-layers bf16``).
        int8: quantized convs as exact int8 convolutions (default: where the CPU has an int8 dot product;
            elsewhere OpenVINO's int8 kernels saturate), else as the float reference computes them.
        threads: CPU threads for inference (0: OpenVINO's default).
        cache: export compiled graphs to :func:`cache_dir` and import them from there.
    """

    receptive_radius = RECEPTIVE_RADIUS
    arch = "edsr_baseline"

    def __init__(self, wts: EdsrWeights, mode: str = "dynamic", threads: int = 0, cache: bool = True,
                 fp_layers: str = "fp32", int8: bool | None = None) -> None:
        import openvino as ov

        from ..devices import cpu_has_int8_dot

        if mode not in MODES:
            raise CadyqError(f"--kernels openvino runs --mode dynamic or fp32, not {mode}")
        if fp_layers not in FP_LAYERS:
            raise CadyqError(f"--fp-layers takes {' or '.join(FP_LAYERS)}, not {fp_layers}")
        self.wts, self.mode, self.cache, self.fp_layers = wts, mode, cache, fp_layers
        self.int8 = cpu_has_int8_dot() if int8 is None else int8
        #: the report's ``kernels``: int8 codes on OpenVINO, or the reference's float arithmetic on OpenVINO
        self.kernels = "float" if mode == "fp32" else "openvino" if self.int8 else "openvino-float"
        self.scale = wts.scale
        self.n_selectors = 2 * wts.n_blocks if mode == "dynamic" else 0
        self.core = ov.Core()
        self.version = ov.get_version()
        self.config: dict[str, object] = dict(GRAPH_CONFIG)
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        #: the compiled graphs of the last MAX_COMPILED geometries, with one inference request each (a compiled
        #: graph holds its working memory: keeping every geometry of a big image alive took 12 GB)
        self._compiled: OrderedDict[tuple[Geometry, bool], tuple[object, object]] = OrderedDict()
        #: (seconds, "compiled" | "imported") per geometry prepared by this object
        self.prepare_log: dict[Geometry, tuple[float, str]] = {}

    def _blob_path(self, geo: Geometry, bits_only: bool) -> Path | None:
        folder = cache_dir()
        if folder is None:
            return None
        what = "bits" if bits_only else f"{self.mode}-{self.fp_layers}"
        key = f"{describe(self.wts)}|{geo.key()}|{what}|{self.kernels}|{self.version}|{sorted(self.config.items())}"
        return folder / (f"edsr-x{self.scale}-{what}-{self.kernels}-{geo.key()}-"
                         f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.blob")

    def compiled(self, geo: Geometry, bits_only: bool = False) -> object:
        """The compiled graph for ``geo`` (imported from the cache, or built, compiled and exported); with
        ``bits_only`` the graph of the bits alone (no layers after the last selector)."""
        key = (geo, bits_only)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key][0]
        t0 = time.perf_counter()
        path = self._blob_path(geo, bits_only) if self.cache else None
        cm = None
        if path is not None and path.is_file():
            try:
                cm = self.core.import_model(path.read_bytes(), "CPU", self.config)
                how = "imported"
                with suppress(OSError):  # recently used: the last to go when the cache is trimmed
                    os.utime(path)
            except Exception:  # noqa: BLE001 - a stale or damaged blob: compile again
                cm = None
        if cm is None:
            graph = build_graph(self.wts, geo, self.mode == "dynamic", self.fp_layers, self.int8, bits_only=bits_only)
            cm = self.core.compile_model(graph, "CPU", self.config)
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
                    trim_cache(path.parent, cache_max_bytes(), keep=path)
                except Exception:  # noqa: BLE001 - export_model raises RuntimeError too: no cache, not a failure
                    with suppress(OSError):  # no cache: the next process compiles again
                        tmp.unlink()
        while len(self._compiled) >= MAX_COMPILED:
            self._compiled.popitem(last=False)
        self._compiled[key] = (cm, cm.create_infer_request())
        self.prepare_log[geo] = (time.perf_counter() - t0, how)
        return cm

    def forward(self, x: np.ndarray, geo: Geometry, bits_only: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
        """(sr (1, 3, sH, sW), bits (1, n_sel, nh, nw)) of one tile x (1, 3, H, W) float32 0..255; sr is None
        with ``bits_only``."""
        cm = self.compiled(geo, bits_only)
        res = self._compiled[(geo, bits_only)][1].infer([np.ascontiguousarray(x, dtype=np.float32)])
        sr = None if bits_only else res[cm.output("sr")]
        bits = res[cm.output("bits")] if self.n_selectors else np.zeros((1, 0, 1, 1), np.float32)
        return sr, bits

    def _geometry(self, tile: object, region: int | None) -> Geometry:
        """The graph geometry of a planned tile (its size and place on the region lattice); a tile inside one
        region, and any tile in fp32 mode, has the geometry of its size alone (the same graph: one key)."""
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
        # tiles of one geometry one after another: each graph is prepared once per image (tiles are independent)
        order = sorted(range(len(tiles)), key=lambda k: self._geometry(tiles[k], region).key())
        for i, t in enumerate(tiles[k] for k in order):
            y0, y1, x0, x1 = t.in_box
            sr, bits = self.forward(rgb[y0:y1, x0:x1].transpose(2, 0, 1)[None], self._geometry(t, region), bits_only)
            if out is not None and sr is not None:
                oy0, oy1, ox0, ox1 = t.out_box
                part = np.clip(sr[0, :, t.src_y : t.src_y + oy1 - oy0, t.src_x : t.src_x + ox1 - ox0], 0, 255)
                if out_dtype == "uint8":
                    part = np.rint(np.nan_to_num(part, nan=0.0))  # half to even, as the PyTorch engine
                out[oy0:oy1, ox0:ox1] = part.transpose(1, 2, 0)
            regions.add_tile(t, bits[0])
            if progress is not None:
                progress(i + 1, len(tiles))
        table = edsr_cost_table(s, self.wts.n_blocks, self.wts.n_feats)
        report = build_report(regions, self.n_selectors, s, table, self.mode, self.mode == "dynamic", None, cfg.tiling,
                              time.perf_counter() - t0, kernels=self.kernels, fp_layers=self.fp_layers)
        return out, report


def load_openvino_model(model: str | None = None, weights: str | Path | None = None, scale: int | None = 4,
                        mode: str = "dynamic", threads: int = 0, cache: bool = True, fp_layers: str = "fp32",
                        int8: bool | None = None) -> OVModel:
    """Load a shipped EDSR-baseline model (or an EDSR-baseline safetensors file) for the OpenVINO runtime.

    Raises:
        CadyqError: openvino is not installed, the model is not EDSR-baseline, or the mode is not supported.
    """
    if not openvino_available():
        raise CadyqError("--kernels openvino needs the openvino package (pip install openvino)")
    from ..weights import DEFAULT_MODEL, resolve_weights, shipped_path

    if weights is None:
        cfg = resolve_weights(model or DEFAULT_MODEL, scale)
        if cfg.arch != "edsr_baseline":
            raise CadyqError(f"--kernels openvino runs the EDSR-baseline models only, not {cfg.name}")
        path = shipped_path(cfg)
    else:
        path = Path(weights)
        if path.suffix != ".safetensors" or not path.is_file():
            raise CadyqError(f"{path}: --kernels openvino reads EDSR-baseline .safetensors files only")
    try:
        wts = read_edsr(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise CadyqError(f"{path}: cannot run on OpenVINO ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if scale is not None and wts.scale != scale:
        raise CadyqError(f"{path}: the weights are for x{wts.scale}, not x{scale}")
    return OVModel(wts, mode, threads, cache, fp_layers, int8)
