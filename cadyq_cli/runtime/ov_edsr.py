"""EDSR-baseline CADyQ as OpenVINO graphs (the shared machinery and the graphs' semantics: :mod:`ov_graph`).

The network of :class:`cadyq_cli.models.edsr.EDSRBaseline`: the mean shift and head conv, residual blocks
(selector, quantized conv, ReLU, selector, quantized conv; the fixed 8-bit quantizer of the residual; the skip of
the weights' ``skip``), the body's last conv plus the head (FP32), the upsampling tail and the mean shift back;
the gradient feature times 1000.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .ov_graph import _F, Geometry, GraphBuilder, NetWeights, read_safetensors, tensor_shape

if TYPE_CHECKING:
    from ..accounting import ConvCost

__all__ = ["EdsrWeights", "read_edsr", "edsr_weights", "edsr_blocks"]

GRAD_MULTIPLIER = 1000.0


def edsr_blocks(sd: Mapping[str, np.ndarray]) -> int:
    """Number of residual blocks of an EDSR state dict."""
    n = 0
    while f"body.{n}.body.0.weight" in sd:
        n += 1
    return n


@dataclass
class EdsrWeights(NetWeights):
    """An EDSR-baseline CADyQ checkpoint (:class:`NetWeights`)."""

    n_blocks: int = field(init=False, default=0)
    arch: ClassVar[str] = "edsr_baseline"
    cache_name: ClassVar[str] = "edsr"
    receptive_radius: ClassVar[int] = 40  # as :attr:`cadyq_cli.models.edsr.EDSRBaseline.receptive_radius`
    graph_version: ClassVar[int] = 10  # bump whenever this module's graph code changes

    def __post_init__(self) -> None:
        super().__post_init__()
        self.n_blocks = edsr_blocks(self.sd)
        self.n_feats = int(tensor_shape(self.sd, "head.0.weight")[0])
        self.n_selectors = 2 * self.n_blocks  # two per residual block

    def cost_table(self) -> list[ConvCost]:
        """The convolutions' costs (:func:`cadyq_cli.accounting.edsr_cost_table`)."""
        from ..accounting import edsr_cost_table

        return edsr_cost_table(self.scale, self.n_blocks, self.n_feats)

    def builder(self, layout: str = "fp32", int8: bool = True, fp_layers: str = "fp32",
                geo: Geometry | None = None) -> _EdsrBuilder:
        """EDSR-baseline's graph builder for one graph (arguments as :class:`cadyq_cli.runtime.ov_graph.GraphBuilder`)."""
        return _EdsrBuilder(self, layout, int8, fp_layers, geo)


def read_edsr(path: str | Path) -> EdsrWeights:
    """Read one of our EDSR-baseline safetensors files (metadata ``arch``, ``scale``, ``act_grid``, ``skip``); the
    tensors are decoded when a graph is built from them.

    Raises:
        ValueError: not an EDSR-baseline CADyQ safetensors file.
    """
    return edsr_weights(*read_safetensors(path))


def edsr_weights(sd: Mapping[str, np.ndarray], meta: dict[str, str], sha256: str) -> EdsrWeights:
    """The EDSR-baseline weights of a safetensors file read by :func:`~cadyq_cli.runtime.ov_graph.read_safetensors`.

    Raises:
        ValueError: not EDSR-baseline CADyQ weights.
    """
    if meta.get("arch", "edsr_baseline") != "edsr_baseline" or "body.0.bitsel1.net_small.0.weight" not in sd:
        raise ValueError("not EDSR-baseline CADyQ weights")
    t0 = sd.shape("tail.0.0.weight") if "tail.0.0.weight" in sd else (0, 0)
    scale = int(meta["scale"]) if str(meta.get("scale", "")).isdigit() else (
        3 if t0[0] == 9 * t0[1] else 4 if "tail.0.2.weight" in sd else 2)
    return EdsrWeights(sd, scale, meta.get("act_grid", "signed"), meta.get("skip", "official"), sha256)


class _EdsrBuilder(GraphBuilder):
    """EDSR-baseline's head, body and tail on the shared builder (module docstring)."""

    grad_multiplier = GRAD_MULTIPLIER
    name = "edsr"

    def body(self, x: object) -> object:
        """Head and body of image x (1, 3, H, W): the features entering the tail, (1, C, H, W)."""
        op, sd, wts = self.op, self.w.sd, self.w
        self.check_identity_shifts("sub_mean", "add_mean")
        head = self.conv(op.add(x, self.c(sd["sub_mean.bias"].reshape(1, 3, 1, 1))), sd["head.0.weight"], sd["head.0.bias"])
        self.quant_setup(x)
        r = self.enter_body(head)
        for i in range(wts.n_blocks):
            p = f"body.{i}"
            t, value = self.conv_pair(r, f"{p}.bitsel1", f"{p}.body.0", f"{p}.body.2", f"{p}.body.3")
            if not self.quantized:  # value: the block input as bitsel1 passes it on (with a learned shift, shifted)
                r = op.add(t, r if wts.skip == "fp" else value)
                continue
            a3 = _F(sd[f"{p}.quant_act3.alpha"].reshape(()))  # the fixed 8-bit quantizer of the residual
            c3 = op.round(op.multiply(op.clamp(op.divide(t, self.c(a3)), -1.0, 1.0), self.c(127.0)), "half_to_even")
            t = op.multiply(op.divide(c3, self.c(127.0)), self.c(a3))
            r = op.add(t, r if wts.skip == "fp" else value)
        n = wts.n_blocks
        return op.add(self.conv(self.as_nchw(r), sd[f"body.{n}.weight"], sd[f"body.{n}.bias"]), head)

    def tail(self, r: object) -> object:
        """The upsampling tail (upsampler convs, pixel shuffles, last conv) of LR features r (1, C, h, W)."""
        op, sd, wts = self.op, self.w.sd, self.w
        bf16 = self.fp_layers == "bf16"  # the tail in bf16 (as PyTorch's CPU autocast runs it)
        if bf16:
            r = op.convert(r, "bf16")
        if wts.scale == 3:
            r = op.depth_to_space(self.conv(r, sd["tail.0.0.weight"], sd["tail.0.0.bias"], bf16=bf16), "depth_first", 3)
        else:
            for j in range(wts.scale // 2):
                r = op.depth_to_space(self.conv(r, sd[f"tail.0.{2 * j}.weight"], sd[f"tail.0.{2 * j}.bias"], bf16=bf16),
                                      "depth_first", 2)
        r = self.conv(r, sd["tail.1.weight"], sd["tail.1.bias"], bf16=bf16)
        r = op.convert(r, np.float32) if bf16 else r
        return op.add(r, self.c(sd["add_mean.bias"].reshape(1, 3, 1, 1)))
