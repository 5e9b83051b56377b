"""Parity of our library with the independent official-CADyQ reference (tests/official_reference.py).

Official-format checkpoints (random weights, calibrated clip values, random selector heads so the
chosen bits vary) are written with ``torch.save`` the way the official code stores them, loaded
with :func:`cadyq_cli.checkpoint.load_model_file` and run through the engine; the reference runs
the official inference on the same state dict. Outputs must agree to one grey level and every
selector's bits must be identical.

Also: PAMS checkpoints (converted on load), refused/unreadable files, and a safetensors round trip.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cadyq_cli.checkpoint import load_model_file, save_weights
from cadyq_cli.engine import TilingConfig, upscale_array
from cadyq_cli.errors import CheckpointMismatchError, CheckpointReadError, UnsafeCheckpointError
from cadyq_cli.models._base import SRModel
from cadyq_cli.quant import set_quant_mode

try:
    from tests import official_reference as ref
except ImportError:  # tests/ itself on sys.path (pytest prepend mode)
    import official_reference as ref  # type: ignore[no-redef]

#: (arch, scale) run against the reference; the arch names are the reference's (``edsr``).
CASES = [("edsr", 4), ("carn", 4), ("srresnet", 4), ("idn", 4), ("edsr", 2), ("edsr", 3)]
SAVE_FORMS = [("bare", "model.pt"), ("wrapped", "model_best.pth.tar"), ("bare", "model.pth.tar"), ("wrapped", "ckpt.pt")]


def _content(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 HWC image with flat, smooth and noisy areas (so selectors choose different bits)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    img[..., 0] = 120.0 + 60.0 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    img[..., 1] = img[..., 0] * 0.8 + 25
    img[..., 2] = img[..., 0] * 0.6 + 40
    img[: h // 3, : w // 3] = (150, 110, 90)  # flat corner
    noisy = (yy + 2 * xx) % 5 < 2  # striped mask of noise
    img[noisy] = rng.integers(0, 256, size=(int(noisy.sum()), 3))
    img[-(h // 3) :, -(w // 3) :] = rng.integers(0, 256, size=(h // 3, w // 3, 3))  # noisy corner
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _calib_batch() -> torch.Tensor:
    """Calibration input (N,3,20,20) on 0..255: smooth, flat+stripes, and noise."""
    a = torch.from_numpy(_content(20, 20, 100)).permute(2, 0, 1).float()
    b = torch.from_numpy(_content(20, 20, 101)[::-1].copy()).permute(2, 0, 1).float()
    c = torch.randint(0, 256, (3, 20, 20), generator=torch.Generator().manual_seed(7)).float()
    return torch.stack([a, b, c])


_SD_CACHE: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}


def _official_sd(arch: str, scale: int, kind: str = "cadyq") -> dict[str, torch.Tensor]:
    """Random official state dict with calibrated clips (cached per module run)."""
    key = (arch, scale, kind)
    if key not in _SD_CACHE:
        sd = ref.random_official_state_dict(arch, scale, kind, seed=3)
        _SD_CACHE[key] = ref.calibrate_alphas(sd, arch, scale, _calib_batch())
    return _SD_CACHE[key]


def _save(sd: dict[str, torch.Tensor], path: Path, form: str) -> Path:
    torch.save(sd if form == "bare" else {"state_dict": sd, "epoch": 1}, path)
    return path


def _load_all_forms(sd: dict[str, torch.Tensor], tmp_path: Path, arch: str, scale: int) -> SRModel:
    """Save sd in every official form, load each, check they agree; return one model (dynamic)."""
    models = [load_model_file(_save(sd, tmp_path / name, form), arch=arch, scale=scale) for form, name in SAVE_FORMS]
    first = models[0].state_dict()
    for m in models[1:]:
        other = m.state_dict()
        assert list(other) == list(first)
        assert all(torch.equal(first[k], other[k]) for k in first)
    model = models[0]
    set_quant_mode(model, "dynamic")
    return model


def _as_float(lr: np.ndarray) -> np.ndarray:
    return lr.astype(np.float32)


def _round(sr: np.ndarray) -> np.ndarray:
    return np.round(sr).astype(np.int32)


def _max_diff(ours: np.ndarray, official: np.ndarray) -> int:
    assert ours.shape == official.shape
    return int(np.abs(_round(ours) - official.astype(np.int32)).max())


def _bits_of(report) -> list[list[int]]:  # noqa: ANN001
    return [r.bits for r in report.regions]


@pytest.mark.parametrize(("arch", "scale"), CASES)
def test_cadyq_checkpoint_parity(tmp_path: Path, arch: str, scale: int) -> None:
    """Whole image and the patch protocol (24/20 geometry) against the official inference."""
    sd = _official_sd(arch, scale)
    model = _load_all_forms(sd, tmp_path, arch, scale)
    assert model.n_selectors == ref.N_SELECTORS[arch]

    # (a) whole image: one forward at batch 1
    lr = _content(18, 22, seed=1)
    hr_ref, bits_ref = ref.official_whole_test(sd, arch, scale, lr)
    sr, rep = upscale_array(model, _as_float(lr), TilingConfig("whole"))
    assert sr.shape == (18 * scale, 22 * scale, 3)
    assert _max_diff(sr, hr_ref) <= 1
    assert _bits_of(rep) == [[int(b) for b in bits_ref[0].tolist()]]
    assert rep.fab == pytest.approx(float(ref.fab(bits_ref)[0]))
    seen = set(bits_ref.flatten().tolist())

    # (b) patch protocol, 24/20: 2 x 3 patches of 24..30 px (last row/column extended),
    # run batched by the engine but per patch by the reference
    lr = _content(50, 70, seed=2)
    hr_ref, pbits_ref = ref.official_patch_test(sd, arch, scale, lr, patch=24, step=20)
    sr, rep = upscale_array(model, _as_float(lr), TilingConfig("paper", tile=24, overlap=4, batch=8))
    assert len(pbits_ref) == 6 and rep.grid == (2, 3)
    assert _max_diff(sr, hr_ref) <= 1
    assert _bits_of(rep) == [[int(v) for v in b[0].tolist()] for b in pbits_ref]
    for b in pbits_ref:
        seen |= set(b.flatten().tolist())
    assert len(seen) > 1, f"bits never varied for {arch} x{scale}: {seen}"  # the test must exercise selection


def test_paper_96_90_edsr(tmp_path: Path) -> None:
    """The real official geometry (96/90) on EDSR x2: two patches of 96 and 96 px."""
    sd = _official_sd("edsr", 2)
    model = _load_all_forms(sd, tmp_path, "edsr", 2)
    lr = _content(96, 186, seed=4)
    hr_ref, pbits_ref = ref.official_patch_test(sd, "edsr", 2, lr)  # 96 / 90 defaults
    sr, rep = upscale_array(model, _as_float(lr), TilingConfig("paper"))
    assert len(pbits_ref) == 2 and rep.grid == (1, 2)
    assert _max_diff(sr, hr_ref) <= 1
    assert _bits_of(rep) == [[int(v) for v in b[0].tolist()] for b in pbits_ref]
    assert len({v for b in pbits_ref for v in b.flatten().tolist()}) > 1


@pytest.mark.parametrize(("arch", "scale"), [("edsr", 4), ("carn", 4), ("srresnet", 4), ("idn", 4), ("edsr", 2)])
def test_pams_checkpoint_parity(tmp_path: Path, arch: str, scale: int) -> None:
    """A PAMS file is converted on load; in w8a8 it reproduces the official PAMS inference."""
    sd = _official_sd(arch, scale, "pams")
    model = load_model_file(_save(sd, tmp_path / "pams.pth.tar", "wrapped"), arch=arch, scale=scale)
    set_quant_mode(model, "w8a8")
    lr = _content(18, 22, seed=5)
    hr_ref, bits_ref = ref.official_whole_test(sd, arch, scale, lr)
    assert bits_ref.shape == (1, 0)
    sr, rep = upscale_array(model, _as_float(lr), TilingConfig("whole"))
    assert _max_diff(sr, hr_ref) <= 1
    # the converted selectors have the official fresh head: dynamic mode picks 8 bits everywhere
    set_quant_mode(model, "dynamic")
    sr_dyn, rep_dyn = upscale_array(model, _as_float(lr), TilingConfig("whole"))
    assert all(b == 8 for r in rep_dyn.regions for b in r.bits)
    assert np.array_equal(sr_dyn, sr)


# --------------------------------------------------------------------------- refused files


def test_foreign_state_dict_is_a_mismatch(tmp_path: Path) -> None:
    resnet = {
        "conv1.weight": torch.randn(64, 3, 7, 7),
        "bn1.weight": torch.ones(64),
        "bn1.bias": torch.zeros(64),
        "layer1.0.conv1.weight": torch.randn(64, 64, 3, 3),
        "fc.weight": torch.randn(1000, 512),
        "fc.bias": torch.zeros(1000),
    }
    path = _save(resnet, tmp_path / "resnet18.pth", "bare")
    with pytest.raises(CheckpointMismatchError, match="conv1.weight|missing|unexpected"):
        load_model_file(path, arch="edsr", scale=4)
    with pytest.raises(CheckpointMismatchError, match="known architecture"):
        load_model_file(path)


def test_other_arch_is_a_mismatch(tmp_path: Path) -> None:
    path = _save(ref.random_official_state_dict("carn", 4, "cadyq"), tmp_path / "carn.pt", "wrapped")
    with pytest.raises(CheckpointMismatchError, match="carn"):
        load_model_file(path, arch="edsr", scale=4)


@pytest.mark.parametrize(("arch", "have", "want"), [("edsr", 2, 4), ("edsr", 4, 3), ("srresnet", 2, 4)])
def test_other_scale_is_a_mismatch(tmp_path: Path, arch: str, have: int, want: int) -> None:
    path = _save(ref.random_official_state_dict(arch, have, "cadyq"), tmp_path / "m.pt", "bare")
    with pytest.raises(CheckpointMismatchError, match=f"x{have}.*x{want}"):
        load_model_file(path, arch=arch, scale=want)


class _Payload:
    """Unpickling this object would run a shell command."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.target}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_unexecuted(tmp_path: Path, writer: str) -> None:
    pwned = tmp_path / "pwned"
    obj = {"state_dict": {"head.0.weight": torch.zeros(1)}, "x": _Payload(pwned)}
    path = tmp_path / "evil.pth.tar"
    if writer == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    assert not pwned.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_model_file(path, arch="edsr", scale=4)
    assert not pwned.exists()


def test_truncated_checkpoint_is_a_read_error(tmp_path: Path) -> None:
    good = _save(ref.random_official_state_dict("edsr", 2, "cadyq"), tmp_path / "good.pt", "bare")
    data = good.read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointReadError):
            load_model_file(bad, arch="edsr", scale=2)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    sd = _official_sd("edsr", 2)
    model = load_model_file(_save(sd, tmp_path / "m.pt", "bare"), arch="edsr", scale=2)
    out = tmp_path / "m.safetensors"
    save_weights(model, out)
    again = load_model_file(out)  # arch and scale come from the file's metadata
    assert (again.arch, again.scale) == (model.arch, model.scale)
    x = torch.from_numpy(_content(14, 17, seed=6)).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        for mode in ("dynamic", "w8a6", "fp32"):
            set_quant_mode(model, mode)
            set_quant_mode(again, mode)
            y0, b0 = model(x)
            y1, b1 = again(x)
            assert torch.equal(y0, y1) and torch.equal(b0, b1)


def test_safetensors_export_is_byte_reproducible(tmp_path: Path) -> None:
    """Three processes saving the same weights write the same bytes (the safetensors library
    writes its metadata in the order of a randomly seeded Rust hash map, different in each
    process; save_weights sorts the header)."""
    import subprocess
    import sys

    code = ("import sys, torch; from cadyq_cli.models import create_model; from cadyq_cli.checkpoint import save_weights; "
            "torch.manual_seed(0); save_weights(create_model('edsr_baseline', 2), sys.argv[1], "
            "{'name': 'x', 'a': '1', 'b': '2', 'c': '3', 'd': [4, 5]})")
    outs = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for i, out in enumerate(outs):
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()
    from safetensors import safe_open

    with safe_open(str(outs[0]), "pt") as f:
        assert f.metadata()["d"] == "[4, 5]" and f.metadata()["arch"] == "edsr_baseline"
