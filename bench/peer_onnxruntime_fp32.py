"""Peer for bench/peers.py: plain FP32 EDSR-baseline on ONNX Runtime, as a user would run it.

The FP32 network of the same weights (no quantizers, no tiling) as an ``.onnx`` file, built once from
the safetensors with ``onnx.helper`` (the state-dict keys :func:`cadyq_cli.runtime.ov_graph.build_network`
reads; H and W symbolic) and cached in ``$CADYQ_CACHE_DIR/onnx`` keyed by the
weights' sha256. A run: ONNX Runtime session (``ORT_ENABLE_ALL``, CPU), read PNG, one inference on
the whole image, clip, round, write PNG. No PyTorch, no OpenVINO.
Usage: python bench/peer_onnxruntime_fp32.py WEIGHTS.safetensors IN.png OUT.png [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cadyq_cli.weights import file_sha256  # noqa: E402

#: bump whenever the graph built here changes (cache key)
ONNX_GRAPH_VERSION = 1
OPSET = 17


def cache_path(weights: str | os.PathLike[str]) -> Path:
    """Where the .onnx of ``weights`` is cached (``$CADYQ_CACHE_DIR/onnx``, default ``~/.cache/cadyq/onnx``).

    The base folder is :func:`cadyq_cli.runtime.cache.cache_base` (a module with no heavy imports)."""
    from cadyq_cli.runtime.cache import cache_base

    base = cache_base() or Path(tempfile.gettempdir()) / "cadyq"
    return base / "onnx" / f"edsr-fp32-v{ONNX_GRAPH_VERSION}-{file_sha256(weights)[:16]}.onnx"


def build_onnx(weights: str | os.PathLike[str]) -> object:
    """The ``onnx.ModelProto`` of the plain FP32 EDSR-baseline in ``weights``: input ``x`` (1, 3, H, W) on
    0..255, output ``sr`` (1, 3, sH, sW), not clamped."""
    from onnx import TensorProto, helper, numpy_helper

    from cadyq_cli.runtime.ov_edsr import read_edsr

    wts = read_edsr(weights)
    sd = wts.sd
    for name in ("sub_mean", "add_mean"):
        if not np.array_equal(sd[f"{name}.weight"].reshape(3, 3), np.eye(3, dtype=np.float32)):
            raise ValueError(f"{name} is not the identity mean shift")
    inits: list = []
    nodes: list = []

    def const(name: str, v: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(x: str, key: str, out: str) -> str:
        return node("Conv", [x, const(f"{key}.weight", sd[f"{key}.weight"]), const(f"{key}.bias", sd[f"{key}.bias"])],
                    out, kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    x = node("Add", ["x", const("sub_mean.bias", sd["sub_mean.bias"].reshape(1, 3, 1, 1))], "shifted")
    head = conv(x, "head.0", "head")
    r = head
    for i in range(wts.n_blocks):
        t = node("Relu", [conv(r, f"body.{i}.body.0", f"b{i}.conv0")], f"b{i}.relu")
        r = node("Add", [conv(t, f"body.{i}.body.3", f"b{i}.conv3"), r], f"b{i}.out")
    r = node("Add", [conv(r, f"body.{wts.n_blocks}", "body.end"), head], "features")
    steps = [(3, "tail.0.0")] if wts.scale == 3 else [(2, f"tail.0.{2 * j}") for j in range(wts.scale // 2)]
    for j, (block, key) in enumerate(steps):  # PixelShuffle is DepthToSpace in CRD order
        r = node("DepthToSpace", [conv(r, key, f"up{j}.conv")], f"up{j}", blocksize=block, mode="CRD")
    node("Add", [conv(r, "tail.1", "tail"), const("add_mean.bias", sd["add_mean.bias"].reshape(1, 3, 1, 1))], "sr")
    s = wts.scale
    graph = helper.make_graph(
        nodes, "edsr_fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, f"{s}H", f"{s}W"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cadyq-bench")
    model.ir_version = 8
    return model


def onnx_file(weights: str | os.PathLike[str]) -> Path:
    """The cached .onnx of ``weights``, built and written atomically when missing."""
    path = cache_path(weights)
    if not path.is_file():
        model = build_onnx(weights)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model.SerializeToString())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def session(weights: str | os.PathLike[str], threads: int = 0) -> object:
    """An ONNX Runtime CPU session of the cached graph (all graph optimizations; ``threads`` 0: ORT's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_file(weights)), so, providers=["CPUExecutionProvider"])


def main() -> None:
    from PIL import Image

    p = argparse.ArgumentParser()
    p.add_argument("weights")
    p.add_argument("inp")
    p.add_argument("out")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--png-level", type=int, default=6, help="zlib level of the PNG (6: Pillow's default)")
    a = p.parse_args()
    sess = session(a.weights, a.threads)
    x = np.asarray(Image.open(a.inp).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None]
    y = sess.run(["sr"], {"x": np.ascontiguousarray(x)})[0]
    Image.fromarray(np.rint(np.clip(y[0], 0, 255)).astype(np.uint8).transpose(1, 2, 0)).save(a.out, compress_level=a.png_level)


if __name__ == "__main__":
    main()
