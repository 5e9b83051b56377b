"""Tests for the benchmark protocol: MATLAB imresize, PSNR/SSIM on Y, ``evaluate`` and ``cadyq eval``.

Self-contained: the datasets are a few tiny generated images in ``tmp_path``.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cadyq_cli import evaluate as ev
from cadyq_cli.checkpoint import save_weights
from cadyq_cli.cli import app
from cadyq_cli.evaluate import EvalInputError, evaluate, results_to_json, write_csv
from cadyq_cli.metrics import psnr_y, rgb_to_y, ssim_y
from cadyq_cli.models import create_model
from cadyq_cli.resize import imresize

# --------------------------------------------------------------------------- imresize


def test_imresize_constant_stays_constant() -> None:
    img = np.full((23, 17, 3), 137, np.uint8)
    assert (imresize(img, 1 / 4) == 137).all() and imresize(img, 1 / 4).shape == (6, 5, 3)
    assert (imresize(img, 3) == 137).all() and imresize(img, 3).shape == (69, 51, 3)
    f = np.full((9, 8), 0.25)
    np.testing.assert_allclose(imresize(f, 0.5), 0.25, atol=1e-14)


def test_imresize_upsample_matches_matlab() -> None:
    # MATLAB: imresize([0 1 2 3], [1 8]) -> -0.0938 0.1797 0.7266 1.2500 1.7500 2.2734 2.8203 3.0938
    out = imresize(np.array([[0.0, 1, 2, 3]]), output_shape=(1, 8))
    expected = [-0.09375, 0.1796875, 0.7265625, 1.25, 1.75, 2.2734375, 2.8203125, 3.09375]
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-12)
    assert np.allclose(np.round(out[0], 4), [-0.0938, 0.1797, 0.7266, 1.25, 1.75, 2.2734, 2.8203, 3.0938], atol=1e-4)


def test_imresize_antialiased_downscale_by_hand() -> None:
    # x0.5 with kernel 0.5*cubic(0.5 t) over 8 taps; first output centre u = 1.5 (1-based).
    # Distances/2 0.25, 0.75, 1.25, 1.75 give cubic 0.8671875, 0.2265625, -0.0703125, -0.0234375
    # (sum over both sides 2), so normalised weights 0.43359375, 0.11328125, -0.03515625,
    # -0.01171875 on positions 1,0,-1,-2 (mirrored to 1,1,2,3) and 2,3,4,5 (mirrored 4 -> 4, 5 -> 4):
    # out1 = 0.546875 a1 + 0.3984375 a2 + 0.1015625 a3 - 0.046875 a4 = 0.4609375 for a = 0..3,
    # out2 = 3 - out1 = 2.5390625 by symmetry. The ramp 4*r + c then gives:
    ramp = np.arange(16, dtype=np.float64).reshape(4, 4)
    np.testing.assert_allclose(imresize(ramp, 0.5), [[2.3046875, 4.3828125], [10.6171875, 12.6953125]],
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(imresize(np.array([[0.0, 1, 2, 3]]), output_shape=(1, 2)), [[0.4609375, 2.5390625]],
                               atol=1e-12)


def test_imresize_uint8_rounds_half_up_and_clips() -> None:
    # float results 10 * [-0.09375 0.1796875 0.7265625 1.25 1.75 ...]: 12.5 -> 13 and 17.5 -> 18
    # (MATLAB rounds half away from zero, np.rint would give 12), -0.9375 clips to 0.
    up = imresize(np.array([[0, 10, 20, 30]], np.uint8), output_shape=(1, 8))
    assert up.dtype == np.uint8
    assert up[0].tolist() == [0, 2, 7, 13, 18, 23, 28, 31]
    down = imresize(np.array([[255, 245, 235, 225]], np.uint8), output_shape=(1, 8))
    assert down[0].tolist() == [255, 253, 248, 243, 238, 232, 227, 224]  # 255.9375 clips to 255


# --------------------------------------------------------------------------- PSNR / SSIM

Y_GAIN = (65.738 + 129.057 + 25.064) / 256  # Y change per unit change of R = G = B (PSNR convention)


def _smooth(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([60 + 2.5 * x, 50 + 3 * y, 120 + 40 * np.sin(x / 6.0 + y / 9.0)], axis=2)
    return np.clip(base + rng.normal(0, 3, base.shape), 0, 255).round().astype(np.uint8)


def test_psnr_constant_offset() -> None:
    hr = _smooth()
    hr = np.clip(hr, 0, 240).astype(np.uint8)
    for k in (1, 4, 10):
        sr = hr + np.uint8(k)
        d = k * Y_GAIN
        assert psnr_y(sr, hr, 2) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)


def test_psnr_identical_is_inf_and_shave_is_respected() -> None:
    hr = _smooth()
    assert psnr_y(hr, hr.copy(), 4) == math.inf
    sr = hr.astype(np.float64).copy()
    s = 3
    sr[:s] += 20
    sr[-s:] += 20
    sr[:, :s] -= 20
    sr[:, -s:] -= 20  # only the border differs
    assert psnr_y(sr, hr, s) == math.inf
    assert math.isfinite(psnr_y(sr, hr, s - 1)) and math.isfinite(psnr_y(sr, hr, 0))
    sr[s, s] += 10  # first pixel inside the shave
    n = (hr.shape[0] - 2 * s) * (hr.shape[1] - 2 * s)
    assert psnr_y(sr, hr, s) == pytest.approx(-10 * math.log10((10 * Y_GAIN / 255) ** 2 / n), abs=1e-9)
    with pytest.raises(ValueError):
        psnr_y(hr, hr[:-1], 2)


def test_ssim_identical_and_decreasing_with_noise() -> None:
    hr = _smooth()
    assert ssim_y(hr, hr.copy(), 2) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(7)
    vals = []
    for sigma in (2, 6, 15, 40):
        noisy = np.clip(hr + rng.normal(0, sigma, hr.shape), 0, 255).round()
        vals.append(ssim_y(noisy, hr, 2))
    assert all(a > b for a, b in zip(vals, vals[1:])), vals
    assert 0 < vals[-1] < vals[0] < 1


def test_ssim_of_two_flat_images_has_closed_form() -> None:
    # flat images: the variances vanish, SSIM = (2 ab + C1) / (a^2 + b^2 + C1) on Y (the /255 convention)
    a_rgb, b_rgb = 100.0, 110.0
    a = rgb_to_y(np.full((1, 1, 3), a_rgb), 255.0)[0, 0]
    b = rgb_to_y(np.full((1, 1, 3), b_rgb), 255.0)[0, 0]
    c1 = (0.01 * 255) ** 2
    got = ssim_y(np.full((30, 30, 3), a_rgb), np.full((30, 30, 3), b_rgb), 2)
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


# --------------------------------------------------------------------------- evaluate


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """Three small HR images: RGB 48x40, RGB 47x41 (not a multiple of 2 or 4), gray 40x44."""
    d = tmp_path / "Tiny"
    d.mkdir()
    Image.fromarray(_smooth(40, 48, 1)).save(d / "b_rgb.png")
    Image.fromarray(_smooth(41, 47, 2)).save(d / "a_odd.png")
    Image.fromarray(_smooth(44, 40, 3)[..., 1]).save(d / "c_gray.png")  # mode L
    (d / "notes.txt").write_text("not an image")
    return d


def test_evaluate_bicubic(dataset: Path) -> None:
    res = evaluate([dataset], 2, None, ["fp32"], bicubic=True)
    assert res.scale == 2 and res.model is None and len(res.results) == 1
    row = res.results[0]
    assert (row.dataset, row.mode) == ("Tiny", "bicubic")
    assert [i.name for i in row.images] == ["a_odd.png", "b_rgb.png", "c_gray.png"]
    assert row.fab is None and row.bitops is None
    assert 20 < row.psnr < 60 and 0 < row.ssim < 1
    # by hand for the odd-sized image: crop to 40x46, MATLAB bicubic down and up
    hr = np.asarray(Image.open(dataset / "a_odd.png").convert("RGB"))[:40, :46]
    sr = imresize(imresize(hr, 0.5), 2)
    assert row.images[0].psnr == pytest.approx(psnr_y(sr, hr, 2), abs=1e-12)
    assert row.images[0].ssim == pytest.approx(ssim_y(sr, hr, 2), abs=1e-12)
    # gray images are replicated to RGB
    g = np.asarray(Image.open(dataset / "c_gray.png"))
    hr_g = np.repeat(g[:, :, None], 3, axis=2)
    sr_g = imresize(imresize(hr_g, 0.5), 2)
    assert row.images[2].psnr == pytest.approx(psnr_y(sr_g, hr_g, 2), abs=1e-12)
    assert row.psnr == pytest.approx(np.mean([i.psnr for i in row.images]))


def test_evaluate_input_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="no such folder"):
        evaluate([tmp_path / "missing"], 2, None, [], bicubic=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="no images"):
        evaluate([dataset, tmp_path / "empty"], 2, None, [], bicubic=True)
    with pytest.raises(EvalInputError, match="nothing to evaluate"):
        evaluate([dataset], 2, None, ["fp32"], bicubic=False)
    with pytest.raises(EvalInputError, match="tiling"):
        evaluate([dataset], 2, None, [], bicubic=True, tiling="diagonal")


@pytest.fixture(scope="module")
def edsr_x2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "edsr_x2.safetensors"
    save_weights(create_model("edsr", 2), path)  # type: ignore[arg-type]
    return path


def test_evaluate_model_modes_make_lr_once(dataset: Path, edsr_x2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cadyq_cli.checkpoint import load_model_file

    model = load_model_file(edsr_x2, None, 2)
    before = model.mode.name
    calls: list[float] = []
    real = ev.imresize

    def counting(img, scale=None, **kw):  # noqa: ANN001, ANN202
        calls.append(scale)
        return real(img, scale, **kw)

    monkeypatch.setattr(ev, "imresize", counting)
    seen: list[tuple[int, int]] = []
    res = evaluate([dataset], 2, model, ["fp32", "dynamic"], bicubic=True, progress=lambda d, t, lbl: seen.append((d, t)))
    assert calls.count(0.5) == 3 and calls.count(2) == 3  # one LR per image, one bicubic upsampling
    assert seen[-1] == (9, 9) and len(seen) == 9
    assert [r.mode for r in res.results] == ["bicubic", "fp32", "dynamic"]
    fp32, dyn = res.results[1], res.results[2]
    assert fp32.fab == 32.0 and 4.0 <= dyn.fab <= 8.0
    assert dyn.bitops < fp32.bitops
    assert model.mode.name == before  # restored
    with pytest.raises(EvalInputError, match="x2, not x4"):
        evaluate([dataset], 4, model, ["fp32"], bicubic=False)
    with pytest.raises(EvalInputError, match="unknown mode"):
        evaluate([dataset], 2, model, ["w8a3"], bicubic=False)


def test_results_to_json_and_csv(dataset: Path, tmp_path: Path) -> None:
    res = evaluate([dataset], 4, None, [], bicubic=True)
    res.results[0].images[0].psnr = math.inf  # identical images must still give valid JSON
    d = results_to_json(res)
    json.loads(json.dumps(d, allow_nan=False))
    assert d["results"][0]["images"][0]["psnr"] is None
    write_csv(res, tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 3 and rows[0]["fab"] == "" and rows[0]["bitops_g"] == ""


# --------------------------------------------------------------------------- cadyq eval


def _one_line_error(text: str) -> None:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in text, text


def test_cli_eval_bicubic_json_stdout(dataset: Path) -> None:
    r = CliRunner().invoke(app, ["eval", str(dataset), "--scale", "2", "--bicubic", "--json", "-"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)  # stdout carries only JSON; the table went to stderr
    assert set(d) >= {"scale", "model", "results"} and d["scale"] == 2 and d["model"] is None
    (row,) = d["results"]
    assert set(row) == {"dataset", "mode", "psnr", "ssim", "fab", "bitops_g", "images"}
    assert (row["dataset"], row["mode"], row["fab"], row["bitops_g"]) == ("Tiny", "bicubic", None, None)
    assert [set(i) for i in row["images"]] == [{"name", "psnr", "ssim", "fab", "bitops_g"}] * 3
    assert "bicubic" in r.stderr and "PSNR" in r.stderr


def test_cli_eval_weights(dataset: Path, edsr_x2: Path, tmp_path: Path) -> None:
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    r = CliRunner().invoke(app, ["eval", str(dataset), "--scale", "2", "--weights", str(edsr_x2), "--modes",
                                 "fp32,dynamic", "--json", str(out_json), "--csv", str(out_csv), "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr == ""
    d = json.loads(out_json.read_text())
    assert d["scale"] == 2 and "edsr_x2" in d["model"]
    assert [(x["dataset"], x["mode"]) for x in d["results"]] == [("Tiny", "fp32"), ("Tiny", "dynamic")]
    fp32, dyn = d["results"]
    assert fp32["fab"] == 32.0 and 4 <= dyn["fab"] <= 8 and 0 < dyn["bitops_g"] < fp32["bitops_g"]
    assert all(i["fab"] == 32.0 and i["bitops_g"] > 0 for i in fp32["images"])
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 6 and list(rows[0]) == ["dataset", "image", "mode", "psnr", "ssim", "fab", "bitops_g"]
    assert {(x["image"], x["mode"]) for x in rows} == {(n, m) for n in ("a_odd.png", "b_rgb.png", "c_gray.png")
                                                       for m in ("fp32", "dynamic")}
    assert float(rows[0]["psnr"]) == pytest.approx(fp32["images"][0]["psnr"], abs=1e-4)


def test_cli_eval_usage_errors(dataset: Path, tmp_path: Path, edsr_x2: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(tmp_path / "nope"), "--scale", "2", "--bicubic"])
    assert r.exit_code == 2 and r.stdout == ""
    _one_line_error(r.stderr)
    assert "nope" in r.stderr
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["eval", str(tmp_path / "empty"), "--scale", "2", "--bicubic"])
    assert r.exit_code == 2
    _one_line_error(r.stderr)
    r = runner.invoke(app, ["eval", str(dataset), "--scale", "2", "--weights", str(edsr_x2), "--modes", "fp64"])
    assert r.exit_code == 2
    _one_line_error(r.stderr)


def test_evaluate_limit_and_matlab_y(dataset: Path) -> None:
    first = evaluate([dataset], 2, None, [], bicubic=True, limit=2).results[0]
    assert [i.name for i in first.images] == ["a_odd.png", "b_rgb.png"]
    rounded = evaluate([dataset], 2, None, [], bicubic=True, limit=1, round_y=True).results[0].images[0]
    hr = np.asarray(Image.open(dataset / "a_odd.png").convert("RGB"))[:40, :46]
    sr = imresize(imresize(hr, 0.5), 2)
    y = lambda im: np.floor((65.738 * im[..., 0] + 129.057 * im[..., 1] + 25.064 * im[..., 2]) / 256 + 16.5)  # noqa: E731
    d = (y(sr.astype(float)) - y(hr.astype(float)))[2:-2, 2:-2] / 255
    assert rounded.psnr == pytest.approx(-10 * np.log10(np.mean(d * d)), abs=1e-9)
    assert rounded.psnr != pytest.approx(first.images[0].psnr, abs=1e-6)


def test_cli_eval_limit_option(dataset: Path) -> None:
    res = CliRunner().invoke(app, ["eval", str(dataset), "--scale", "2", "--bicubic", "--limit", "1", "--json", "-"])
    assert res.exit_code == 0, res.stderr
    assert len(json.loads(res.stdout)["results"][0]["images"]) == 1
