"""Multi-scale CARN CADyQ as OpenVINO graphs, built from the safetensors (no PyTorch).

The network of :class:`cadyq_cli.models.carn.CARN` in ``dynamic`` (or ``fp32``) mode at inference, on the
builder of :mod:`cadyq_cli.runtime.ov_graph` (selectors, region statistics, quantized convs with their boundary
bands, row strips of the tail, the same graph kinds and outputs):

* the image on the 0..1 scale (``x / 255``), the mean shift, the entry conv (FP32);
* three cascading blocks of three residual units, cascaded through 1x1 convs + ReLU (FP32) inside each block and
  across the blocks: ``c = o = x``; per unit ``c = concat(c, unit(o))``, ``o = relu(conv1x1(c))``;
* a residual unit: selector, quantized 3x3 conv, ReLU, selector (the unsigned grid on ``relu-unsigned``
  weights), quantized 3x3 conv, then ``relu(t + x)`` with the unit's unquantized input;
* the gradient feature without CARN's factor (1, not EDSR's 1000);
* the tail of the requested scale (one file serves x2, x3 and x4): [conv, ReLU, pixel shuffle] once (x2, x3) or
  twice (x4), the exit conv, the mean shift back, times 255.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from .ov_graph import NetWeights, _Builder, _shape, read_safetensors

__all__ = ["CarnWeights", "read_carn", "GRAPH_VERSION"]

#: bump whenever the graph this module builds changes: compiled graphs cached on disk are keyed by it
GRAPH_VERSION = 1
_BLOCKS = (1, 2, 3)  # cascading blocks b1..b3
_UNITS = (1, 2, 3)  # residual units per block
_F = np.float32


@dataclass
class CarnWeights(NetWeights):
    """A multi-scale CARN CADyQ file at one of its scales (``scale``: the tail the graphs use; :class:`NetWeights`)."""

    arch: ClassVar[str] = "carn"
    receptive_radius: ClassVar[int] = 24  # as :attr:`cadyq_cli.models.carn.CARN.receptive_radius`

    def __post_init__(self) -> None:
        self.n_feats = int(_shape(self.sd, "entry.weight")[0])
        self.n_selectors = 2 * len(_BLOCKS) * len(_UNITS)

    def cost_table(self) -> list:
        """The convolutions' costs at this scale (:func:`cadyq_cli.accounting.carn_cost_table`)."""
        from ..accounting import carn_cost_table

        return carn_cost_table(self.scale, self.n_feats)

    def describe(self) -> str:
        """JSON text of what a compiled graph depends on besides its kind and scale (cache keys)."""
        return json.dumps({"arch": self.arch, "sha": self.sha256, "grid": self.act_grid, "graph": GRAPH_VERSION},
                          sort_keys=True)

    def builder(self, *args: object, **kw: object) -> "_CarnBuilder":
        """The graph builder of this network (arguments as :class:`cadyq_cli.runtime.ov_graph._Builder`)."""
        return _CarnBuilder(self, *args, **kw)  # type: ignore[arg-type]


def read_carn(path: str | Path, scale: int) -> CarnWeights:
    """Read one of our CARN safetensors files (metadata ``arch`` = ``carn``, ``act_grid``) for the tail of ``scale``.

    Raises:
        ValueError: not a CARN CADyQ safetensors file, or one without the upsampler of ``scale``.
    """
    sd, meta, sha = read_safetensors(path)
    if meta.get("arch") != "carn" or "b1.b1.body.0.net_small.0.weight" not in sd:
        raise ValueError(f"{path}: not a CARN CADyQ weights file")
    if f"upsample.up{scale}.body.0.weight" not in sd:
        raise ValueError(f"{path}: no x{scale} upsampler in this CARN file")
    if meta.get("skip", "official") != "official":
        raise ValueError(f"{path}: CARN has the official skip only, not {meta['skip']}")
    return CarnWeights(sd, scale, meta.get("act_grid", "signed"), "official", sha)


class _CarnBuilder(_Builder):
    """CARN's head, body and tail on the shared builder (module docstring)."""

    grad_multiplier = 1.0
    name = "carn"

    def conv1x1_relu(self, c: object, name: str) -> object:
        """A cascade's fusion: ReLU of the FP32 1x1 conv ``name`` of body tensor ``c``."""
        sd = self.w.sd
        y = self.conv(self.as_nchw(c), sd[f"{name}.weight"], sd[f"{name}.bias"], (0, 0))
        return self.as_body(self.op.relu(y))

    def unit(self, x: object, p: str) -> object:
        """Residual unit ``p`` (``b<B>.b<U>``) of body tensor x."""
        op, sd = self.op, self.w.sd
        signed2 = self.w.act_grid != "relu-unsigned"
        if not self.quantized:
            t = op.relu(self.conv(self.as_nchw(x), sd[f"{p}.body.1.weight"], sd[f"{p}.body.1.bias"]))
            t = self.as_body(self.conv(t, sd[f"{p}.body.4.weight"], sd[f"{p}.body.4.bias"]))
            return op.relu(op.add(t, x))
        codes, s_px, value, i_px, steps = self.selector(x, f"{p}.body.0", True)
        if self.int8:
            t = op.relu(self.qconv(codes, s_px, i_px, steps, f"{p}.body.1", True))
            codes2, s2, _, i2, steps2 = self.selector(t, f"{p}.body.3", signed2)
            t = self.qconv(codes2, s2, i2, steps2, f"{p}.body.4", signed2)
        else:  # the reference's arithmetic: FP32 convs of the fake-quantized values and weights
            t = self.as_body(op.relu(self.fconv(self.as_nchw(value), f"{p}.body.1")))
            t = self.as_body(self.fconv(self.as_nchw(self.selector(t, f"{p}.body.3", signed2)[2]), f"{p}.body.4"))
        return op.relu(op.add(t, x))

    def cascade(self, x: object, parts: list, fuse: list[str]) -> object:
        """CARN's cascade over ``parts`` (callables of a body tensor) fused by the 1x1 convs ``fuse``."""
        c = o = x
        axis = 3 if self.cl else 1
        for part, name in zip(parts, fuse):
            c = self.op.concat([c, part(o)], axis)
            o = self.conv1x1_relu(c, name)
        return o

    def body(self, x: object) -> object:
        """Entry and cascading blocks of image x (1, 3, H, W) on the 0..255 scale: the features entering the
        upsampler, (1, C, H, W)."""
        op, sd = self.op, self.w.sd
        for name in ("sub_mean", "add_mean"):
            if not np.array_equal(sd[f"{name}.shifter.weight"].reshape(3, 3), np.eye(3, dtype=_F)):
                raise ValueError(f"{name} is not the identity mean shift")
        x01 = op.divide(x, self.c(255.0))
        head = self.conv(op.add(x01, self.c(sd["sub_mean.shifter.bias"].reshape(1, 3, 1, 1))),
                         sd["entry.weight"], sd["entry.bias"])
        self.quant_setup(x)
        r = self.enter_body(head)

        def block(b: int):  # noqa: ANN202
            return lambda t: self.cascade(t, [lambda v, u=u: self.unit(v, f"b{b}.b{u}") for u in _UNITS],
                                          [f"b{b}.c{u}.body.0" for u in _UNITS])

        r = self.cascade(r, [block(b) for b in _BLOCKS], [f"c{b}.body.0" for b in _BLOCKS])
        return self.as_nchw(r)

    def tail(self, r: object) -> object:
        """The upsampler of the weights' scale, the exit conv and the mean shift back, times 255: LR features
        r (1, C, h, W) -> (1, 3, s*h, s*W) on the 0..255 scale."""
        op, sd, s = self.op, self.w.sd, self.w.scale
        bf16 = self.fp_layers == "bf16"  # the tail in bf16 (as PyTorch's CPU autocast runs it)
        if bf16:
            r = op.convert(r, "bf16")
        for j in range(1 if s == 3 else s // 2):
            name = f"upsample.up{s}.body.{3 * j}"
            r = op.depth_to_space(op.relu(self.conv(r, sd[f"{name}.weight"], sd[f"{name}.bias"], bf16=bf16)),
                                  "depth_first", 3 if s == 3 else 2)
        r = self.conv(r, sd["exit.weight"], sd["exit.bias"], bf16=bf16)
        r = op.convert(r, np.float32) if bf16 else r
        return op.multiply(op.add(r, self.c(sd["add_mean.shifter.bias"].reshape(1, 3, 1, 1))), self.c(255.0))
