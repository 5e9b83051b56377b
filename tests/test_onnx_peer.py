"""bench/peer_onnxruntime_fp32.py (the ONNX Runtime FP32 peer of bench/peers.py) against the PyTorch FP32
network of the same shipped weights. Skipped without onnxruntime + onnx (``pip install cadyq[bench]``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from peer_onnxruntime_fp32 import cache_path, onnx_file, session  # noqa: E402

from cadyq_cli.engine import upscale_array  # noqa: E402
from cadyq_cli.weights import load_model, resolve_weights  # noqa: E402


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.random((h, w, 3)) * 255).astype(np.float32)


@pytest.mark.parametrize("scale", [3, 4])  # one DepthToSpace by 3; two by 2
def test_matches_pytorch_fp32(scale: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADYQ_CACHE_DIR", str(tmp_path))
    wpath = resolve_weights("edsr-baseline", scale).path
    x = _image(18, 26)
    ref, _ = upscale_array(load_model(scale=scale, mode="fp32", kernels="float"), x)
    y = session(wpath, threads=1).run(["sr"], {"x": np.ascontiguousarray(x.transpose(2, 0, 1)[None])})[0]
    y = np.clip(y[0].transpose(1, 2, 0), 0, 255)
    assert y.shape == ref.shape == (18 * scale, 26 * scale, 3)
    assert np.abs(y - ref).max() < 1e-2
    assert ref.std() > 10  # a real picture, not a flat one
    # cached: one file, no leftovers, reused (not rewritten) by the next call
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [cache_path(wpath).name]
    mtime = cache_path(wpath).stat().st_mtime_ns
    assert onnx_file(wpath) == cache_path(wpath) and cache_path(wpath).stat().st_mtime_ns == mtime


def test_script_writes_png(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(_image(16, 20).astype(np.uint8)).save(tmp_path / "in.png")
    wpath = resolve_weights("edsr-baseline", 4).path
    env = dict(os.environ, CADYQ_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "bench/peer_onnxruntime_fp32.py"), str(wpath), str(tmp_path / "in.png"),
                          str(tmp_path / "out.png"), "--threads", "1"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "out.png").size == (80, 64)
