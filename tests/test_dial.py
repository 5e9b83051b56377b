"""The compute dial: ``--bit-bias`` and ``--target-fab``."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cadyq_cli.cli import app
from cadyq_cli.dial import fit_bit_bias
from cadyq_cli.engine import TilingConfig, upscale_array

CFG = TilingConfig("seamless", region=16)


@pytest.fixture()
def model(load_x2: Callable[[str], object]) -> object:
    m = load_x2("dynamic")
    yield m
    m.set_bit_bias(0.0)


def test_zero_bias_is_the_model_as_trained(model: object, pattern: Callable[..., np.ndarray]) -> None:
    rgb = pattern(48, 40).astype(np.float32)
    ref, rep_ref = upscale_array(model, rgb, CFG)
    model.set_bit_bias(3.0)
    moved, rep_moved = upscale_array(model, rgb, CFG)
    model.set_bit_bias(0.0)
    again, rep = upscale_array(model, rgb, CFG)
    assert np.array_equal(again, ref) and rep.fab == rep_ref.fab and rep.bit_bias == 0.0
    assert rep_moved.bit_bias == 3.0 and rep_moved.fab < rep_ref.fab  # the dial really moved the bits


def test_fab_falls_monotonically_with_the_bias(model: object, pattern: Callable[..., np.ndarray]) -> None:
    rgb = pattern(48, 40, seed=3).astype(np.float32)
    fabs = []
    for b in (-64, -8, -2, 0, 2, 8, 64):
        model.set_bit_bias(b)
        fabs.append(upscale_array(model, rgb, CFG, bits_only=True)[1].fab)
    assert all(a >= b for a, b in zip(fabs, fabs[1:])), fabs
    assert fabs[0] == 8.0 and fabs[-1] == 4.0  # the ends of the dial: every selector at 8, then at 4 bits


def test_bits_only_probe_gives_the_same_bits(model: object, pattern: Callable[..., np.ndarray]) -> None:
    rgb = pattern(40, 36, seed=1).astype(np.float32)
    sr, full = upscale_array(model, rgb, CFG)
    none, probe = upscale_array(model, rgb, CFG, bits_only=True)
    assert none is None and sr is not None
    assert [r.bits for r in probe.regions] == [r.bits for r in full.regions]


@pytest.mark.parametrize("target", [4.6, 5.0, 7.0])
def test_fit_lands_near_the_target(model: object, pattern: Callable[..., np.ndarray], target: float) -> None:
    rgb = pattern(48, 40, seed=2).astype(np.float32)
    fit = fit_bit_bias(model, rgb, CFG, target)
    assert abs(fit.fab - target) <= 0.15, fit
    assert fit.probes <= 12 and model.bit_bias == 0.0  # the model's own bias is restored
    model.set_bit_bias(fit.bias)
    assert upscale_array(model, rgb, CFG)[1].fab == fit.fab


def test_cli_dial(weights_x2: Path, make_image: Callable[..., Path], tmp_path: Path) -> None:
    run = CliRunner().invoke
    src = make_image("d.png", 48, 40)
    base = ["--weights", str(weights_x2), "--scale", "2", "--threads", "1", "--region", "16", "--json", "-", "--quiet"]
    res = run(app, ["upscale", str(src), str(tmp_path / "a.png"), "--bit-bias", "2.5", *base])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["bit_bias"] == 2.5
    res = run(app, ["upscale", str(src), str(tmp_path / "b.png"), "--target-fab", "5", *base])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["target_fab"] == 5.0 and abs(rec["fab"] - 5.0) <= 0.15 and rec["probes"] >= 1
    for bad in (["--target-fab", "9"], ["--target-fab", "5", "--bit-bias", "1"], ["--target-fab", "5", "--mode", "w8a8"],
                ["--bit-bias", "1", "--mode", "w8a4"], ["--bit-bias", "nan"]):
        out = tmp_path / "x.png"
        res = run(app, ["upscale", str(src), str(out), *bad, *base])
        assert res.exit_code == 2, (bad, res.output)
        assert "Traceback" not in res.output and not out.exists()


def test_eval_curve(weights_x2: Path, tmp_path: Path, pattern: Callable[..., np.ndarray]) -> None:
    """``eval --curve``: fixed points and dynamic points over the biases; FAB falls as the bias rises."""
    from PIL import Image

    d = tmp_path / "Tiny"
    d.mkdir()
    for i in range(2):
        Image.fromarray(pattern(64, 48, seed=i)).save(d / f"{i}.png")
    png, csv_path = tmp_path / "curve.png", tmp_path / "curve.csv"
    res = CliRunner().invoke(app, ["eval", str(d), "--scale", "2", "--weights", str(weights_x2), "--threads", "1",
                                   "--curve", str(png), "--curve-csv", str(csv_path), "--biases", "-50,0,3,50", "--quiet"])
    assert res.exit_code == 0, res.output
    import csv

    rows = list(csv.DictReader(open(csv_path)))
    assert [r["mode"] for r in rows] == ["fp32", "w8a8", "w8a4", "dynamic", "dynamic", "dynamic", "dynamic"]
    dyn = [(float(r["bit_bias"]), float(r["fab"]), float(r["bitops_g"])) for r in rows if r["mode"] == "dynamic"]
    assert [b for b, _, _ in dyn] == [-50, 0, 3, 50]
    assert all(a[1] >= b[1] and a[2] >= b[2] for a, b in zip(dyn, dyn[1:])), dyn
    fixed = {r["mode"]: r for r in rows}
    assert float(fixed["w8a8"]["fab"]) == dyn[0][1] == 8.0 and float(fixed["w8a4"]["fab"]) == dyn[-1][1] == 4.0
    assert Image.open(png).size[0] > 500  # a real figure
    from cadyq_cli.curve import plot_curve, read_curve_csv

    again = read_curve_csv(csv_path)  # the CSV redraws the same figure (bench/plot_curve.py)
    assert [(r["mode"], r["bit_bias"]) for r in again] == [(r["mode"], float(r["bit_bias"]) if r["bit_bias"] else None)
                                                          for r in rows]
    plot_curve(again, tmp_path / "again.png", "t")
    assert Image.open(tmp_path / "again.png").size == Image.open(png).size
    res = CliRunner().invoke(app, ["eval", str(d), "--scale", "2", "--weights", str(weights_x2), "--curve",
                                   str(tmp_path / "c2.png"), "--biases", "1,x"])
    assert res.exit_code == 2 and not (tmp_path / "c2.png").exists()
    res = CliRunner().invoke(app, ["eval", str(d), "--scale", "2", "--weights", str(weights_x2), "--modes", "w8a8@2"])
    assert res.exit_code == 2 and "dynamic@" in res.output


def test_a_bit_floor_holds_its_layers_at_8_bits(weights_x2: Path, pattern: Callable[..., np.ndarray]) -> None:
    """SRModel.fold_bit_floor (export --bit-floor): the named selectors pick 8 bits in every region, even with
    the dial at its cheapest, where every other selector picks 4 as in the unfloored model; an unknown name is
    refused. (At other settings the others still choose by content: their inputs change with the floors.)"""
    rgb = pattern(48, 40, seed=4).astype(np.float32)
    from cadyq_cli.weights import load_model

    plain, floored = (load_model(weights=weights_x2, scale=2, mode="dynamic") for _ in range(2))
    names = floored.selector_names()
    assert len(names) == len(floored.selectors) and names[0] == "body.0.bitsel1"
    keep = [0, len(names) - 1]
    floored.fold_bit_floor([names[i] for i in keep])
    ref = upscale_array(plain, rgb, CFG)[1]
    rep = upscale_array(floored, rgb, CFG)[1]
    assert all(r.bits[i] == 8 for r in rep.regions for i in keep)
    assert any(r.bits[i] != 8 for r in ref.regions for i in keep)  # the floor changed something
    plain.set_bit_bias(50.0)  # the cheapest setting for these random selectors (as in the curve test)
    floored.set_bit_bias(50.0)
    assert all(set(r.bits) == {4} for r in upscale_array(plain, rgb, CFG)[1].regions)
    cheap = upscale_array(floored, rgb, CFG)[1]
    assert all(r.bits == [8 if i in keep else 4 for i in range(len(names))] for r in cheap.regions)
    with pytest.raises(ValueError, match="no bit selector 'body.99.bitsel1'"):
        floored.fold_bit_floor(["body.99.bitsel1"])


def test_a_folded_bias_picks_as_the_dial(weights_x2: Path, pattern: Callable[..., np.ndarray]) -> None:
    """An operating point folded into the weights (SRModel.fold_bit_bias, export --fold-bit-bias) gives the bits
    the dial gives at that bias, with the dial at 0; non-finite biases are refused."""
    rgb = pattern(48, 40, seed=4).astype(np.float32)
    from cadyq_cli.weights import load_model

    dial, folded = (load_model(weights=weights_x2, scale=2, mode="dynamic") for _ in range(2))
    dial.set_bit_bias(1.5)
    ref = upscale_array(dial, rgb, CFG)[1]
    dial.set_bit_bias(0.0)
    plain = upscale_array(folded, rgb, CFG)[1]
    folded.fold_bit_bias(1.5)
    rep = upscale_array(folded, rgb, CFG)[1]
    assert [r.bits for r in rep.regions] == [r.bits for r in ref.regions] and rep.bit_bias == 0.0
    assert rep.fab < plain.fab  # it moved the bits, as the dial did
    with pytest.raises(ValueError):
        folded.fold_bit_bias(float("nan"))
