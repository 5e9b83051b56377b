"""CADyQ networks as OpenVINO graphs, built from the safetensors (no PyTorch): what every network shares.

Graphs: the head and body of tiles of any size (:func:`build_body`; the tile's place on the region
lattice comes in as inputs, :meth:`Geometry.inputs`, one graph per :meth:`Geometry.layout`), or of one
tile geometry with those inputs as constants and the tail inside (faster; ``geo``, ``with_tail``); the
upsampling tail alone (:func:`build_tail`, run on row strips); the plain FP32 network (:func:`build_network`).
A network is its weights' class (:class:`NetWeights`: ``ov_edsr.EdsrWeights``, ``ov_carn.CarnWeights``) and its
builder's :meth:`GraphBuilder.body` and :meth:`GraphBuilder.tail`; the rest is here.

Semantics are those of the PyTorch models in ``dynamic`` mode at inference (the ``--kernels float``
reference), restated in OpenVINO ops:

* selectors: per region (a ``region`` px lattice anchored at the image origin, offset ``(pt, pl)``
  inside the tile) the mean |Sobel| of the gray input (times the network's factor) and the unbiased
  per-channel std of the layer input, a linear layer, first maximum -> 4/6/8 bits; per-pixel maps of the
  chosen clip ``alpha``, ``qmax`` and step ``alpha / qmax`` are gathered from the per-region values;
* codes ``round(clip(x / alpha, lo, 1) * qmax)`` (``lo`` = -1, or 0 on the unsigned grid), by the
  same float operations in the same order as :func:`cadyq_cli.quant.primitives.act_codes`;
* a quantized conv is ``FakeQuantize(codes) -> Convolution <- int8 weight codes``, which the CPU
  plugin runs as an int8 convolution (exact int32 sums), times the step map, plus bias. That is
  exact wherever a 3x3 window lies in one region; on the two rows/columns at each interior region
  boundary the output is recomputed from a band of four input lines, one integer pass per
  candidate bit-width (codes of other bit-widths zeroed), ``sum_b step_b * int_conv(codes_b)``, and
  scattered back;
* without an int8 dot product (``int8=False``) a quantized conv is instead the float reference's: an FP32
  conv of the fake-quantized values with the weights on their 8-bit grid (no boundary bands needed);
* full-precision layers in FP32 (``INFERENCE_PRECISION_HINT=f32``), or the tail in bf16
  (``fp_layers="bf16"``); the tail runs in row strips to bound a big tile's memory.

Outputs: ``sr`` (1, 3, sH, sW), not clamped (or the body's features ``r``), and the selectors' ``idx``
(:func:`bits_from_idx`: bits (1, n_selectors, nh, nw)).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from ..accounting import ConvCost

__all__ = ["NetWeights", "GraphBuilder", "Geometry", "LAYOUTS", "read_safetensors", "tensor_shape", "build_body",
           "build_tail", "build_network", "bits_from_idx", "tail_strips", "CANDIDATE_BITS", "FP_LAYERS", "GRAPH_VERSION"]

CANDIDATE_BITS = (4, 6, 8)
#: precisions of the full-precision upsampling tail (as :data:`cadyq_cli.models._base.FP_LAYERS`)
FP_LAYERS = ("fp32", "bf16")
#: the tail's strips, cut like :meth:`cadyq_cli.models._base.SRModel.run_tail` (which keeps 3 rows, 256 MB): bytes
#: of high-resolution intermediates, and LR rows of context. EDSR's and CARN's tails reach 1 + 1/2 + 1/4 LR px at
#: x4 (1 + 1/2 at x2, 1 + 1/3 at x3), so 2 rows give every kept row exactly its own inputs. 128 MB rather than
#: PyTorch's 256: the first inference of a 320x240 tile takes 47k page faults instead of 80k, ~0.03 s less at
#: the same steady speed, 120 MB less peak memory (bench/tail_strips.py)
TAIL_BUDGET_BYTES = 1 << 27
TAIL_HALO = 2
#: bump whenever the graphs this module builds change (every network's: selectors, quantized convs, strips);
#: with each network's own ``graph_version``, it keys the compiled graphs cached on disk
GRAPH_VERSION = 2  # 2: learned input shifts (--act-shift)
#: activation grids of the weights (as :data:`cadyq_cli.models._base.ACT_GRIDS`)
ACT_GRIDS = ("signed", "relu-unsigned")
_F = np.float32


def _qmax(bits: int, signed: bool) -> int:
    """Largest code of a grid (as :func:`cadyq_cli.quant.primitives.qmax_for_bits`)."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


class _Tensors(Mapping[str, np.ndarray]):
    """The tensors of a safetensors file's bytes, decoded (as contiguous float32) on first access; the names and
    shapes come from its header. A process that imports a cached compiled graph never decodes them."""

    def __init__(self, blob: bytes, header: dict[str, dict]) -> None:
        import threading

        self._blob, self._shapes = blob, {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        self._data: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key`` (without decoding)."""
        return self._shapes[key]

    def _all(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._data is None:
                from safetensors.numpy import load

                self._data = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in load(self._blob).items()}
                self._blob = b""
            return self._data

    def __getitem__(self, key: str) -> np.ndarray:
        return self._all()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


#: bytes per element of the safetensors dtypes the runtime reads (decoded to float32)
_ITEMSIZE = {"F32": 4, "F16": 2, "F64": 8}


def tensor_shape(sd: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    """Shape of tensor ``key`` of ``sd``, without decoding the tensors of a file read by :func:`read_safetensors`."""
    return sd.shape(key) if isinstance(sd, _Tensors) else tuple(sd[key].shape)


@dataclass
class NetWeights:
    """A network's CADyQ weights as numpy arrays (``sd``: name -> float32 array) at the ``scale`` its graphs run,
    and what the engine asks of them: ``arch``, ``n_feats`` (channels entering the tail), ``n_selectors``,
    ``receptive_radius`` (LR px of context a pixel depends on, as the PyTorch model's), ``multi_scale`` (one file
    serves several scales: graphs without the tail are the same at each), :meth:`cost_table`, :meth:`describe`
    (cache keys) and :meth:`builder` (the graph builder). One subclass per network.

    Raises:
        ValueError: an unknown ``act_grid``; learned input shifts (``*.act_shift``) on some selectors only, or of
            another length than the selector's channels.
    """

    sd: Mapping[str, np.ndarray]
    scale: int
    act_grid: str = "signed"
    skip: str = "official"
    sha256: str = ""
    n_feats: int = field(init=False, default=0)
    n_selectors: int = field(init=False, default=0)
    arch: ClassVar[str] = ""
    #: the first word of the network's compiled-graph cache files where it is not ``arch``
    cache_name: ClassVar[str] = ""
    receptive_radius: ClassVar[int] = 0
    multi_scale: ClassVar[bool] = False
    #: bump whenever the network's own graph code changes (with the shared :data:`GRAPH_VERSION`: cache keys)
    graph_version: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if self.act_grid not in ACT_GRIDS:
            raise ValueError(f"unknown activation grid {self.act_grid!r} (this cadyq knows {', '.join(ACT_GRIDS)})")
        sels = {k[: -len("net_small.0.weight")] for k in self.sd if k.endswith("net_small.0.weight")}
        shifts = {k[: -len("act_shift")] for k in self.sd if k.endswith(".act_shift")}
        if shifts and shifts != sels:
            raise ValueError(f"learned input shifts on {len(shifts & sels)} of {len(sels)} selectors"
                             + (f" and on {len(shifts - sels)} unknown ones" if shifts - sels else ""))
        for p in sorted(shifts):
            if tensor_shape(self.sd, p + "act_shift") != (tensor_shape(self.sd, p + "net_small.0.weight")[1] - 2,):
                raise ValueError(f"{p}act_shift has shape {tensor_shape(self.sd, p + 'act_shift')}, not one value per channel")

    def cost_table(self) -> list[ConvCost]:
        """The network's convolutions at :attr:`scale`, for BitOPs (:mod:`cadyq_cli.accounting`)."""
        raise NotImplementedError

    def describe(self) -> str:
        """JSON text of what a compiled graph depends on besides its kind and scale (cache keys)."""
        return json.dumps({"arch": self.arch, "sha": self.sha256, "grid": self.act_grid, "skip": self.skip,
                           "graph": f"{GRAPH_VERSION}.{self.graph_version}"}, sort_keys=True)

    def builder(self, layout: str = "fp32", int8: bool = True, fp_layers: str = "fp32",
                geo: Geometry | None = None) -> GraphBuilder:
        """The network's graph builder for one graph (arguments as :class:`GraphBuilder`)."""
        raise NotImplementedError


def read_safetensors(path: str | Path) -> tuple[Mapping[str, np.ndarray], dict[str, str], str]:
    """(tensors, decoded on first access; metadata; sha256 of the file) of a safetensors file, its header checked
    (every tensor's span fits its shape, none overlap, nothing truncated or appended).

    Raises:
        ValueError: not a safetensors file (or a truncated one).
    """
    path = Path(path)
    blob = path.read_bytes()
    try:
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n])
        spans = []
        for k, v in header.items():
            if k == "__metadata__":
                continue
            start, end = (int(o) for o in v["data_offsets"])
            if end - start != _ITEMSIZE[v["dtype"]] * int(np.prod(v["shape"], dtype=np.int64)):
                raise ValueError
            spans.append((start, end))
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])) or 8 + n + (spans[-1][1] if spans else 0) != len(blob):
            raise ValueError  # overlapping tensors, or a truncated (or padded) file
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        raise ValueError("not a safetensors file (or a truncated one)") from None
    return _Tensors(blob, header), dict(header.get("__metadata__") or {}), hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Geometry:
    """One tile's shape and its place on the region lattice: the per-tile inputs of the graphs.

    Attributes:
        h, w: tile size (LR px).
        region: region size, or None for one region per tile.
        pt, pl: offset of the tile's first row/column inside its region (``y0 % region``).
    """

    h: int
    w: int
    region: int | None = None
    pt: int = 0
    pl: int = 0

    def axis(self, length: int, off: int) -> tuple[np.ndarray, list[int]]:
        """(local region index of each pixel, interior boundaries) along one axis."""
        if self.region is None:
            return np.zeros(length, np.int64), []
        idx = (np.arange(length) + off) // self.region
        idx -= idx[0]
        return idx, [int(c) for c in np.nonzero(np.diff(idx))[0] + 1]

    def key(self) -> str:
        """Short text naming the geometry."""
        return f"{self.h}x{self.w}_r{self.region}_{self.pt}_{self.pl}"

    def layout(self, quantized: bool = True, int8: bool = True) -> str:
        """The body graph this tile runs on (:data:`LAYOUTS`): ``fp32`` (no quantizers), ``single`` (one
        region), ``lattice`` (regions, convs without boundary bands: ``int8=False``, or no boundary inside
        the tile), or where region boundaries cut the tile when the int8 convs need bands: ``rows``,
        ``cols``, ``both``."""
        if not quantized:
            return "fp32"
        if self.region is None:
            return "single"
        rb, cb = self.axis(self.h, self.pt)[1], self.axis(self.w, self.pl)[1]
        if not int8 or not (rb or cb):
            return "lattice"
        return "both" if rb and cb else "rows" if rb else "cols"

    def inputs(self, layout: str) -> dict[str, np.ndarray]:
        """The arrays the body graph of ``layout`` takes besides the image: region index of each row and
        column (``ry``, ``cx``), their 0/1 membership matrices (``oh`` (nh, H), ``ow`` (nw, W)), the pixel count
        of each region (``cnt`` (1, 1, nh, nw)), and per cut axis the band of four lines around each boundary
        (:meth:`bands`)."""
        if layout == "fp32":
            return {}
        if layout == "single":
            return {"cnt": np.full((1, 1, 1, 1), self.h * self.w, _F)}
        ry, rb = self.axis(self.h, self.pt)
        cx, cb = self.axis(self.w, self.pl)
        nh, nw = int(ry[-1]) + 1, int(cx[-1]) + 1
        out = {
            "ry": ry, "cx": cx,
            "oh": (ry[None, :] == np.arange(nh)[:, None]).astype(_F),
            "ow": (cx[None, :] == np.arange(nw)[:, None]).astype(_F),
            "cnt": (np.bincount(ry)[:, None] * np.bincount(cx)[None, :]).astype(_F)[None, None],
        }
        for tag, axis, bounds in (("r", 1, rb), ("c", 2, cb)):
            if layout in ("both", "rows" if tag == "r" else "cols"):
                out.update({tag + k: v for k, v in self.bands(axis, bounds).items()})
        return out

    def bands(self, axis: int, bounds: list[int]) -> dict[str, np.ndarray]:
        """Around each boundary c along NHWC ``axis`` (1: rows, 2: columns): ``lines`` c-2..c+1 clipped to the
        tile; ``keep``, the positions in the valid conv over them of the outputs at c-1 (all boundaries first)
        then at c; ``valid``, which gathered lines lie inside the tile (a region of one line at the tile edge
        reads zeros beyond it), shaped to broadcast along ``axis``; ``scat``, the lines those outputs replace."""
        size = self.w if axis == 2 else self.h
        lines = np.array([c + d for c in bounds for d in (-2, -1, 0, 1)], np.int64)
        valid = ((lines >= 0) & (lines < size)).astype(_F)
        nb = len(bounds)
        shape = [1, 1, 1, 1]
        shape[axis] = len(lines)
        return {"lines": np.clip(lines, 0, size - 1),
                "keep": np.array([4 * j for j in range(nb)] + [4 * j + 1 for j in range(nb)], np.int64),
                "valid": valid.reshape(shape),
                "scat": np.array([c - 1 for c in bounds] + list(bounds), np.int64)}


#: body graphs, one per way region boundaries cut a tile (see :meth:`Geometry.layout`)
LAYOUTS = ("fp32", "single", "lattice", "rows", "cols", "both")


def tail_strips(h: int, w: int, n_feats: int, scale: int) -> list[tuple[int, int, int, int]]:
    """Row strips of the tail on LR features (h, w): (a, b, y0, y1), LR rows a..b in, y0..y1 kept, with
    TAIL_HALO rows of context each side, as :meth:`cadyq_cli.models._base.SRModel.run_tail` cuts them. The
    high-resolution intermediates of a strip (two alive, ``C * scale**2`` floats per LR pixel) stay under
    TAIL_BUDGET_BYTES, so a big tile's memory is bounded (a 464 px tile at x4 needed 1.9 GB in one piece)."""
    rows = max(8, TAIL_BUDGET_BYTES // (8 * n_feats * scale * scale * w))
    if rows >= h:
        return [(0, h, 0, h)]
    return [(max(0, y0 - TAIL_HALO), min(h, y0 + rows + TAIL_HALO), y0, min(h, y0 + rows)) for y0 in range(0, h, rows)]


class GraphBuilder:
    """Builds one graph; one instance per graph. Tile sizes are free (H, W dynamic): what depends on the
    tile's place on the region lattice comes in as inputs (:meth:`Geometry.inputs`).

    The selectors, quantized convs, region statistics and graph assembly are every network's; a subclass per
    network states its :meth:`body` and :meth:`tail` with them (``ov_edsr``, ``ov_carn``)."""

    #: factor on the gradient feature (as the PyTorch model's ``grad_multiplier``)
    grad_multiplier = 1.0
    #: graph names' prefix
    name = "net"

    def __init__(self, wts: NetWeights, layout: str = "fp32", int8: bool = True, fp_layers: str = "fp32",
                 geo: Geometry | None = None) -> None:
        import openvino.opset13 as op

        if fp_layers not in FP_LAYERS:
            raise ValueError(f"fp_layers must be one of {', '.join(FP_LAYERS)}, not {fp_layers!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        self.op, self.w, self.layout, self.int8, self.fp_layers = op, wts, layout, int8, fp_layers
        self.quantized = layout != "fp32"
        self.lattice = layout not in ("fp32", "single")
        self.axes = [(tag, axis) for tag, axis, cut in (("c", 2, layout in ("cols", "both")),
                                                        ("r", 1, layout in ("rows", "both"))) if cut]
        self.bits: list = []
        self.params: dict[str, object] = {}
        #: a graph for one geometry: its inputs are constants, its shapes static
        self.geo, self.fixed = geo, None if geo is None else {"x": (1, 3, geo.h, geo.w), **geo.inputs(layout)}
        self._consts: dict = {}
        #: with region boundaries the body runs channels-last (NHWC tensors): boundary lines are gathered
        #: and scattered along H/W of plain NHWC tensors, which is the memory layout the int8 convs
        #: use, so the transposes around the convs cost nothing
        self.cl = bool(self.axes)

    # --- small helpers -------------------------------------------------------------------
    def c(self, v: object) -> object:
        """A float32 constant (scalars shared)."""
        if isinstance(v, np.ndarray):
            return self.op.constant(v)
        key = ("f", float(v))
        if key not in self._consts:
            self._consts[key] = self.op.constant(np.asarray(v, dtype=_F))
        return self._consts[key]

    def c_i64(self, v: object) -> object:
        """An int64 constant (shared)."""
        arr = np.asarray(v, dtype=np.int64)
        key = ("i", arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.op.constant(arr)
        return self._consts[key]

    def param(self, name: str, shape: list[int], dtype: type = np.float32) -> object:
        """The graph input ``name`` (-1: a free dimension), created once; a constant in a graph for one geometry."""
        if self.fixed is not None and name in self.fixed:
            value = self.fixed[name]
            if isinstance(value, tuple):  # the image: its shape only
                shape = list(value)
            else:
                if name not in self._consts:
                    self._consts[name] = self.op.constant(value)
                return self._consts[name]
        if name not in self.params:
            p = self.op.parameter(shape, dtype, name=name)
            p.output(0).get_tensor().set_names({name})
            self.params[name] = p
        return self.params[name]

    def lattice_in(self, name: str) -> object:
        """One of :meth:`Geometry.inputs`' region arrays."""
        shapes = {"ry": ([-1], np.int64), "cx": ([-1], np.int64), "oh": ([-1, -1], np.float32),
                  "ow": ([-1, -1], np.float32), "cnt": ([1, 1, -1, -1], np.float32)}
        return self.param(name, *shapes[name])

    def conv(self, x: object, weight: np.ndarray, bias: np.ndarray | None, pad: tuple[int, int] = (1, 1),
             bf16: bool = False) -> object:
        """FP32 conv on an NCHW tensor; with ``bf16``, x is a bf16 tensor and the conv (weights, bias, output)
        runs in bf16, as PyTorch's CPU autocast runs it."""
        w = self.c(weight) if not bf16 else self.op.convert(self.c(weight), "bf16")
        y = self.op.convolution(x, w, [1, 1], list(pad), list(pad), [1, 1])
        if bias is None:
            return y
        b = self.c(bias.reshape(1, -1, 1, 1))
        return self.op.add(y, b if not bf16 else self.op.convert(b, "bf16"))

    def nchw(self, x: object) -> object:
        """NHWC x as NCHW."""
        return self.op.transpose(x, self.c_i64([0, 3, 1, 2]))

    def nhwc(self, x: object) -> object:
        """NCHW x as NHWC."""
        return self.op.transpose(x, self.c_i64([0, 2, 3, 1]))

    def as_nchw(self, x: object) -> object:
        """A body tensor seen as NCHW (for convs and pools)."""
        return self.nchw(x) if self.cl else x

    def as_body(self, x: object) -> object:
        """An NCHW tensor as a body tensor."""
        return self.nhwc(x) if self.cl else x

    def sums_nchw(self, x: object) -> object:
        """Sums of NCHW x over each region: (1, C, nh, nw), by matrix products with the membership matrices."""
        op = self.op
        cols = op.matmul(x, self.lattice_in("ow"), False, True)  # (1, C, H, nw)
        return op.matmul(self.lattice_in("oh"), cols, False, False)  # (1, C, nh, nw)

    def region_sums(self, x: object) -> tuple[object, object]:
        """Sums of x and of x*x over each region of body tensor x: (1, 1, nh, nw, C) each from a channels-last
        body (1, H, W, C), (1, C, nh, nw) from an NCHW one, (1, C, 1, 1) with one region.

        Matrix products with the 0/1 region-membership matrices (rows, columns) on x seen as (H, W*C), or as
        (C, H, W): 2.7x faster than region pooling on this CPU, and sums, as the reference computes them (no
        mean times count)."""
        op = self.op
        if not self.lattice:
            def rsum(t: object) -> object:
                return op.reduce_sum(t, self.c_i64([2, 3]), True)
        elif self.cl:
            c = int(self.w.n_feats)

            def rsum(t: object) -> object:
                rows = op.matmul(self.lattice_in("oh"), op.reshape(t, self.c_i64([0, 0, -1]), True), False, False)
                rows = op.reshape(rows, self.c_i64([0, 0, -1, c]), True)  # (1, nh, W, C)
                return op.unsqueeze(op.matmul(self.lattice_in("ow"), rows, False, False), self.c_i64([1]))
        else:
            rsum = self.sums_nchw
        return rsum(x), rsum(op.multiply(x, x))

    def expand(self, m: object) -> object:
        """Per-region map (1, nh, nw, k) -> per-pixel (1, k, H, W) (or (1, k, 1, 1) with one region)."""
        op = self.op
        m = op.transpose(m, self.c_i64([0, 3, 1, 2]))
        if not self.lattice:
            return m
        m = op.gather(m, self.lattice_in("ry"), self.c_i64(2))
        return op.gather(m, self.lattice_in("cx"), self.c_i64(3))

    # --- the network -----------------------------------------------------------------------
    def grad_feature(self, x: object) -> object:
        """The selectors' gradient feature of image x (1, 3, H, W) on the 0..255 scale: per region, the mean |Sobel|
        x and y of its gray image on the 0..1 scale (as :func:`cadyq_cli.models._base.grad_feature`), times
        :attr:`grad_multiplier`: (1, 2, nh, nw)."""
        op = self.op
        x01 = op.divide(x, self.c(255.0))
        ch = op.split(x01, self.c_i64(1), 3)
        gray = op.add(op.add(op.multiply(ch.output(0), self.c(0.299)), op.multiply(ch.output(1), self.c(0.587))),
                      op.multiply(ch.output(2), self.c(0.114)))
        padded = op.pad(gray, self.c_i64([0, 0, 1, 1]), self.c_i64([0, 0, 1, 1]), "edge")
        sx = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], _F) / _F(8.0)
        k = np.stack([sx, sx.T])[:, None]
        g = op.abs(op.convolution(padded, self.c(k), [1, 1], [0, 0], [0, 0], [1, 1]))
        # the region mean as the reference takes it: the sum over the region, divided by its pixel count
        mean = op.divide(self.sums_nchw(g), self.lattice_in("cnt")) if self.lattice else \
            op.reduce_mean(g, self.c_i64([2, 3]), True)
        return mean if self.grad_multiplier == 1.0 else op.multiply(mean, self.c(self.grad_multiplier))

    def selector(self, x: object, prefix: str, signed: bool) -> tuple[object, object, object, object, np.ndarray]:
        """Choose bits per region for body tensor ``x``; returns (codes, step map (NCHW), value, bit-index map,
        steps); maps are (1, 1, H, W), or (1, H, W, 1) in a channels-last body (except the step map)."""
        op, sd = self.op, self.w.sd
        wl, bl = sd[f"{prefix}.net_small.0.weight"], sd[f"{prefix}.net_small.0.bias"]
        s1, s2 = self.region_sums(x)  # (1, 1, nh, nw, C) channels-last, else (1, C, nh, nw)
        n, den, has = self.counts
        var = op.divide(op.subtract(s2, op.divide(op.multiply(s1, s1), n)), den)
        std = op.multiply(op.sqrt(op.maximum(var, self.c(0.0))), has)
        if self.cl:
            z = op.concat([self.gradf5, std], 4)
            logits, axis = op.add(op.matmul(z, self.c(np.ascontiguousarray(wl)), False, True), self.c(bl)), 4
        else:
            z = op.concat([self.gradf, std], 1)
            logits, axis = self.conv(z, wl[:, :, None, None], bl, (0, 0)), 1
        # the first maximum wins (as torch.argmax): a stable TopK of one, i32 index (1, 1, nh, nw[, 1])
        idx = op.topk(logits, self.c_i64(1), axis, "max", "value", "i32", True).output(1)
        self.bits.append(idx)
        alphas = [_F(sd[f"{prefix}.quant_bit{k + 1}.alpha"].reshape(())) for k in range(3)]
        qmaxes = [_F(_qmax(b, signed)) for b in CANDIDATE_BITS]
        steps = np.array([a / q for a, q in zip(alphas, qmaxes)], _F)
        table = np.stack([alphas, qmaxes, steps, np.arange(3, dtype=_F)], axis=1).astype(_F)  # (3, 4)
        x = self.shifted(x, prefix)  # after the statistics: the features read the unshifted input
        idx3 = op.squeeze(idx, self.c_i64([1, 4] if self.cl else [1]))  # (1, nh, nw)
        per_region = op.gather(self.c(table), idx3, self.c_i64(0))  # (1, nh, nw, 4)
        maps = op.split(self.expand(per_region), self.c_i64(1), 4)  # (1, 1, H, W) each
        a_px, q_px, s_px, i_px = (maps.output(k) for k in range(4))
        if self.cl:  # one channel: (1, 1, H, W) and (1, H, W, 1) are the same memory; the step map
            # rescales the conv output while it is still NCHW
            a_px, q_px, i_px = (op.unsqueeze(op.squeeze(m, self.c_i64([1])), self.c_i64([3])) for m in (a_px, q_px, i_px))
        codes = op.round(op.multiply(op.clamp(op.divide(x, a_px), -1.0 if signed else 0.0, 1.0), q_px), "half_to_even")
        value = op.multiply(op.divide(codes, q_px), a_px)
        return codes, s_px, value, i_px, steps

    def shifted(self, x: object, prefix: str) -> object:
        """Body tensor ``x`` plus selector ``prefix``'s learned per-channel input shift (weights trained with
        ``--act-shift``), or ``x`` itself where the weights have none."""
        key = f"{prefix}.act_shift"
        if key not in self.w.sd:
            return x
        t = np.asarray(self.w.sd[key], _F)
        return self.op.add(x, self.c(t.reshape((1, 1, 1, -1) if self.cl else (1, -1, 1, 1))))

    def fconv(self, value: object, name: str) -> object:
        """The quantized conv ``name`` as the float reference runs it: FP32 conv of the fake-quantized input
        ``value`` with the weights on their 8-bit grid (``round(w * 127 / m) * m / 127``, in that order)."""
        w = self.w.sd[f"{name}.weight"]
        m = _F(np.abs(w).max()) + _F(1e-8)
        wq = (np.round((w * _F(127)) / m) * m / _F(127)).astype(_F)
        return self.conv(value, wq, self.w.sd[f"{name}.bias"])

    def qconv(self, codes: object, s_px: object, i_px: object, steps: np.ndarray, name: str, signed: bool) -> object:
        """The quantized conv ``name`` on ``codes``: integer sums, rescaled by the step of each input region."""
        op, sd = self.op, self.w.sd
        w = sd[f"{name}.weight"]
        bias = sd[f"{name}.bias"]
        m = _F(np.abs(w).max()) + _F(1e-8)
        wcodes = np.round(w * _F(127) / m).astype(np.int8)
        s_w = _F(float(m) / 127)
        lo, hi = (-128.0, 127.0) if signed else (0.0, 255.0)
        wq = op.multiply(op.convert(op.constant(wcodes), np.float32), self.c(s_w))

        def int_conv(k: object, pad: tuple[int, int], nhwc: bool) -> object:  # s_w * integer sums (NCHW out)
            fq = op.fake_quantize(k, self.c(lo), self.c(hi), self.c(lo), self.c(hi), 256)
            return op.convolution(self.nchw(fq) if nhwc else fq, wq, [1, 1], list(pad), list(pad), [1, 1])

        y = op.add(op.multiply(int_conv(codes, (1, 1), self.cl), s_px), self.c(bias.reshape(1, -1, 1, 1)))
        if not self.cl:
            return y
        y = self.nhwc(y)
        b4 = self.c(bias.reshape(1, 1, 1, -1))
        for tag, axis in self.axes:  # NHWC axes: columns, rows
            band = {k: self.param(tag + k, [-1] if k != "valid" else [1, -1, 1, 1] if axis == 1 else [1, 1, -1, 1],
                                  np.int64 if k != "valid" else np.float32) for k in ("lines", "keep", "valid", "scat")}
            # the four lines c-2..c+1 of every boundary side by side; one batch entry per bit-width
            # with the codes of the other bit-widths (and of lines beyond the tile) zeroed
            kb = op.gather(codes, band["lines"], self.c_i64(axis))
            ib = op.gather(i_px, band["lines"], self.c_i64(axis))
            sel = op.convert(op.equal(ib, self.c(np.arange(3, dtype=_F).reshape(3, 1, 1, 1))), np.float32)
            sel = op.multiply(sel, band["valid"])
            r = int_conv(op.multiply(kb, sel), (1, 0) if axis == 2 else (0, 1), True)  # valid along the axis
            r = op.reduce_sum(op.multiply(r, self.c(steps.reshape(3, 1, 1, 1))), self.c_i64([0]), True)
            r = op.add(op.gather(self.nhwc(r), band["keep"], self.c_i64(axis)), b4)
            y = op.scatter_update(y, band["scat"], r, self.c_i64(axis))
        return y

    def quant_setup(self, x: object) -> None:
        """What every selector of a quantized graph reads: the region pixel counts and the gradient feature of
        image x (1, 3, H, W) on the 0..255 scale."""
        if not self.quantized:
            return
        op = self.op
        cnt = self.lattice_in("cnt") if self.lattice else self.param("cnt", [1, 1, 1, 1])
        if self.cl:
            cnt = op.unsqueeze(cnt, self.c_i64([4]))  # (1, 1, nh, nw, 1), next to channels-last statistics
        self.counts = (cnt, op.maximum(op.subtract(cnt, self.c(1.0)), self.c(1.0)),
                       op.convert(op.greater(cnt, self.c(1.0)), np.float32))
        self.gradf = self.grad_feature(x)
        if self.cl:  # (1, 1, nh, nw, 2), next to the channels-last statistics
            self.gradf5 = op.unsqueeze(op.transpose(self.gradf, self.c_i64([0, 2, 3, 1])), self.c_i64([1]))

    def enter_body(self, head: object) -> object:
        """The head's NCHW output as a body tensor. Channels-last, rewriting one row in place (ScatterUpdate needs
        a plain layout) pins the body to plain NHWC, the conv's own memory order: the transpose becomes free,
        and no residual add reorders later."""
        r = self.as_body(head)
        if self.cl:
            row0 = self.c_i64([0])
            r = self.op.scatter_update(r, row0, self.op.gather(r, row0, self.c_i64(1)), self.c_i64(1))
        return r

    def conv_pair(self, x: object, sel1: str, conv1: str, sel2: str, conv2: str) -> tuple[object, object]:
        """The pair of 3x3 convs every network's blocks have, on body tensor x: selector ``sel1``, conv ``conv1``,
        ReLU, selector ``sel2`` (the unsigned grid on ``relu-unsigned`` weights: its input is a ReLU output), conv
        ``conv2``. Returns (conv2's output, x as ``sel1`` passes it on: quantized, or in an FP32 graph x itself plus
        any learned shift). The convs are
        integer convs, or without int8 the float reference's arithmetic, or FP32 in an FP32 graph."""
        op, sd = self.op, self.w.sd
        if not self.quantized:  # the learned input shifts are part of the network: FP32 adds them too
            x = self.shifted(x, sel1)
            t = op.relu(self.conv(x, sd[f"{conv1}.weight"], sd[f"{conv1}.bias"]))
            return self.conv(self.shifted(t, sel2), sd[f"{conv2}.weight"], sd[f"{conv2}.bias"]), x
        signed2 = self.w.act_grid != "relu-unsigned"
        codes, s_px, value, i_px, steps = self.selector(x, sel1, True)
        if self.int8:
            t = op.relu(self.qconv(codes, s_px, i_px, steps, conv1, True))
            codes2, s2, _, i2, steps2 = self.selector(t, sel2, signed2)
            return self.qconv(codes2, s2, i2, steps2, conv2, signed2), value
        # the reference's arithmetic: FP32 convs of the fake-quantized values and weights (NCHW: no bands)
        t = op.relu(self.fconv(value, conv1))
        return self.fconv(self.selector(t, sel2, signed2)[2], conv2), value

    def check_identity_shifts(self, *names: str) -> None:
        """Refuse mean shifts (1x1 convs ``name``) whose weight is not the identity: the graphs add their bias only."""
        for name in names:
            if not np.array_equal(self.w.sd[f"{name}.weight"].reshape(3, 3), np.eye(3, dtype=_F)):
                raise ValueError(f"{name} is not the identity mean shift")

    def body(self, x: object) -> object:
        """The network's head and body of image x (1, 3, H, W) on the 0..255 scale: the features entering the tail,
        (1, n_feats, H, W) NCHW; the selectors append their choices to ``self.bits`` in forward order."""
        raise NotImplementedError

    def tail(self, r: object) -> object:
        """The network's upsampling tail of LR features r (1, n_feats, h, W): (1, 3, s*h, s*W) on the 0..255 scale."""
        raise NotImplementedError

    def tail_in_strips(self, r: object) -> object:
        """:meth:`tail` of a graph for one geometry on the row strips of :func:`tail_strips`, inside the graph."""
        op, s, g = self.op, self.w.scale, self.geo
        parts = []
        for a, b, y0, y1 in tail_strips(g.h, g.w, int(self.w.n_feats), s):
            part = r if (a, b) == (0, g.h) else op.slice(r, self.c_i64([a]), self.c_i64([b]), self.c_i64([1]), self.c_i64([2]))
            part = self.tail(part)
            if (y0 - a, y1 - a) != (0, b - a):
                part = op.slice(part, self.c_i64([(y0 - a) * s]), self.c_i64([(y1 - a) * s]), self.c_i64([1]), self.c_i64([2]))
            parts.append(part)
        return parts[0] if len(parts) == 1 else op.concat(parts, 2)

    def build_body(self, with_tail: bool = False, bits_only: bool = False) -> object:
        """The body graph (:func:`build_body`)."""
        import openvino as ov

        x = self.param("x", [1, 3, -1, -1])
        r = self.body(x)
        outs = [] if bits_only else [  # bits only: OpenVINO drops the layers after the last selector
            self.op.result(self.tail_in_strips(r), name="sr") if with_tail else self.op.result(r, name="r")]
        if self.quantized:  # selector indices (i32): (1, n_sel, nh, nw), or (1, 1, nh, nw, n_sel) channels-last
            outs.append(self.op.result(self.op.concat(self.bits, 4 if self.cl else 1), name="idx"))
        return ov.Model(outs, list(self.params.values()), f"{self.name}_body_{self.layout}")

    def build_tail(self) -> object:
        """The tail graph (:func:`build_tail`)."""
        import openvino as ov

        r = self.param("r", [1, int(self.w.n_feats), -1, -1])
        return ov.Model([self.op.result(self.tail(r), name="sr")], [r], f"{self.name}_tail_{self.fp_layers}")

    def build_network(self) -> object:
        """The plain FP32 network's graph (:func:`build_network`)."""
        import openvino as ov

        x = self.param("x", [1, 3, -1, -1])
        return ov.Model([self.op.result(self.tail(self.body(x)), name="sr")], [x], f"{self.name}_fp32")


def build_body(wts: NetWeights, layout: str, int8: bool = True, geo: Geometry | None = None,
               with_tail: bool = False, fp_layers: str = "fp32", bits_only: bool = False) -> object:
    """The ``openvino.Model`` of the head and body for tiles of ``layout`` (:meth:`Geometry.layout`; ``fp32``:
    the FP32 network's): inputs ``x`` (1, 3, H, W) and :meth:`Geometry.inputs`, outputs ``r`` (1, C, H, W), the
    features entering the tail, and (quantized) ``idx``, the selectors' choices (see :func:`bits_from_idx`).
    ``int8=False``: quantized convs as FP32 convs of the fake-quantized values, the float reference's
    arithmetic, for CPUs without an int8 dot product. With ``geo``, the graph of that one geometry: the same
    operations on constants and static shapes (input ``x`` alone), which OpenVINO compiles into a faster
    graph (0.75 s against 1.4 s for a 320x240 body here: its channels-last transposes fold into the convs);
    ``with_tail`` then puts the tail (``fp_layers``) in it too, on row strips: output ``sr`` instead of ``r``.
    ``bits_only``: the output ``idx`` alone (quantized layouts). Both kinds give the same bits and, with the tail
    graph, the same bytes (tests/openvino_checks.py holds them to it)."""
    if with_tail and geo is None:
        raise ValueError("with_tail needs the geometry (the graph of one geometry)")
    if bits_only and layout == "fp32":
        raise ValueError("bits_only needs a quantized layout")
    return wts.builder(layout, int8, fp_layers, geo).build_body(with_tail, bits_only)


def build_tail(wts: NetWeights, fp_layers: str = "fp32") -> object:
    """The ``openvino.Model`` of the upsampling tail: ``r`` (1, C, h, W) -> ``sr`` (1, 3, s*h, s*W), not clamped;
    ``fp_layers="bf16"``: in bf16. The engine runs it on row strips (:func:`tail_strips`)."""
    return wts.builder(fp_layers=fp_layers).build_tail()


def build_network(wts: NetWeights) -> object:
    """The plain FP32 network of ``wts`` as one graph, ``x`` -> ``sr``, for any image size: the network
    as a plain export runs it (bench/peer_openvino_fp32.py)."""
    return wts.builder().build_network()


def bits_from_idx(idx: np.ndarray) -> np.ndarray:
    """The body graph's ``idx`` output as bits (1, n_selectors, nh, nw) float32: 4 + 2 * candidate index."""
    if idx.ndim == 5:  # channels-last: (1, 1, nh, nw, n_sel)
        idx = idx[:, 0].transpose(0, 3, 1, 2)
    return idx.astype(_F) * _F(2.0) + _F(4.0)
