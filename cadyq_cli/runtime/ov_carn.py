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

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .ov_graph import Geometry, GraphBuilder, NetWeights, read_safetensors, tensor_shape

if TYPE_CHECKING:
    from ..accounting import ConvCost

__all__ = ["CarnWeights", "read_carn", "carn_weights"]

_BLOCKS = (1, 2, 3)  # cascading blocks b1..b3
_UNITS = (1, 2, 3)  # residual units per block


@dataclass
class CarnWeights(NetWeights):
    """A multi-scale CARN CADyQ file at one of its scales (``scale``: the tail the graphs use; :class:`NetWeights`)."""

    arch: ClassVar[str] = "carn"
    receptive_radius: ClassVar[int] = 24  # as :attr:`cadyq_cli.models.carn.CARN.receptive_radius`
    multi_scale: ClassVar[bool] = True
    graph_version: ClassVar[int] = 2  # bump whenever this module's graph code changes

    def __post_init__(self) -> None:
        super().__post_init__()
        self.n_feats = int(tensor_shape(self.sd, "entry.weight")[0])
        self.n_selectors = 2 * len(_BLOCKS) * len(_UNITS)

    def cost_table(self) -> list[ConvCost]:
        """The convolutions' costs at this scale (:func:`cadyq_cli.accounting.carn_cost_table`)."""
        from ..accounting import carn_cost_table

        return carn_cost_table(self.scale, self.n_feats)

    def builder(self, layout: str = "fp32", int8: bool = True, fp_layers: str = "fp32",
                geo: Geometry | None = None) -> _CarnBuilder:
        """CARN's graph builder for one graph (arguments as :class:`cadyq_cli.runtime.ov_graph.GraphBuilder`)."""
        return _CarnBuilder(self, layout, int8, fp_layers, geo)


def read_carn(path: str | Path, scale: int) -> CarnWeights:
    """Read one of our CARN safetensors files (metadata ``arch`` = ``carn``, ``act_grid``) for the tail of ``scale``.

    Raises:
        ValueError: not a CARN CADyQ safetensors file, or one without the upsampler of ``scale``.
    """
    return carn_weights(*read_safetensors(path), scale)


def carn_weights(sd: Mapping[str, np.ndarray], meta: dict[str, str], sha256: str, scale: int) -> CarnWeights:
    """The CARN weights, at ``scale``, of a safetensors file read by :func:`~cadyq_cli.runtime.ov_graph.read_safetensors`.

    Raises:
        ValueError: not CARN CADyQ weights, or none for ``scale``.
    """
    if meta.get("arch") != "carn" or "b1.b1.body.0.net_small.0.weight" not in sd:
        raise ValueError("not CARN CADyQ weights")
    if f"upsample.up{scale}.body.0.weight" not in sd:
        raise ValueError(f"this CARN has no x{scale} upsampler")
    if meta.get("skip", "official") != "official":
        raise ValueError(f"CARN has the official skip only, not {meta['skip']}")
    return CarnWeights(sd, scale, meta.get("act_grid", "signed"), "official", sha256)


class _CarnBuilder(GraphBuilder):
    """CARN's head, body and tail on the shared builder (module docstring)."""

    grad_multiplier = 1.0
    name = "carn"

    def conv1x1_relu(self, c: object, name: str) -> object:
        """A cascade's fusion: ReLU of the FP32 1x1 conv ``name`` of body tensor ``c``. Channels-last it is a
        matrix product over the channels (a conv there cost a transpose of the concatenation each way:
        docs/performance.md, "CARN")."""
        op, sd = self.op, self.w.sd
        w, b = sd[f"{name}.weight"], sd[f"{name}.bias"]
        if not self.cl:
            return op.relu(self.conv(c, w, b, (0, 0)))
        wt = np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1]).T)  # (C_in, C_out)
        return op.relu(op.add(op.matmul(c, self.c(wt), False, False), self.c(b.reshape(1, 1, 1, -1))))

    def unit(self, x: object, p: str) -> object:
        """Residual unit ``p`` (``b<B>.b<U>``) of body tensor x: its conv pair, then ReLU of the sum with the unit's
        unquantized input."""
        t, _ = self.conv_pair(x, f"{p}.body.0", f"{p}.body.1", f"{p}.body.3", f"{p}.body.4")
        return self.op.relu(self.op.add(t, x))

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
        self.check_identity_shifts("sub_mean.shifter", "add_mean.shifter")
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
        bf16 = self.fp_layers == "bf16"  # the tail's convs in bf16 (PyTorch's CPU autocast also rounds the mean
        # shift back and the x255 to bf16: this graph keeps those two in FP32)
        if bf16:
            r = op.convert(r, "bf16")
        for j in range(1 if s == 3 else s // 2):
            name = f"upsample.up{s}.body.{3 * j}"
            r = op.depth_to_space(op.relu(self.conv(r, sd[f"{name}.weight"], sd[f"{name}.bias"], bf16=bf16)),
                                  "depth_first", 3 if s == 3 else 2)
        r = self.conv(r, sd["exit.weight"], sd["exit.bias"], bf16=bf16)
        r = op.convert(r, np.float32) if bf16 else r
        return op.multiply(op.add(r, self.c(sd["add_mean.shifter.bias"].reshape(1, 3, 1, 1))), self.c(255.0))
