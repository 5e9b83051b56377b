"""Learned per-channel input shifts of the bit selectors (``--act-shift``, QuantSR's redistribution): off by
default, part of the network in every mode, exact on the integer kernels, saved and loaded with the weights."""
from __future__ import annotations

import pytest
import torch

from cadyq_cli.checkpoint import load_model_file, model_from_state_dict, save_weights, weights_digest
from cadyq_cli.models import create_model
from cadyq_cli.quant.intconv import int8_available
from cadyq_cli.quant.modules import QuantContext, set_quant_mode
from cadyq_cli.quant.primitives import fake_quant_act, qmax_for_bits
from tests import official_reference as ref


def _model(shift_sd: float = 0.0) -> torch.nn.Module:
    """A calibrated random EDSR-baseline x2 on the relu-unsigned grid, with shifts N(0, shift_sd) where > 0."""
    sd = ref.random_official_state_dict("edsr", 2, "cadyq", seed=0)
    sd = ref.calibrate_alphas(sd, "edsr", 2, torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 255)
    model = model_from_state_dict(sd, "edsr", 2)
    model.set_act_grid("relu-unsigned")
    if shift_sd:
        model.enable_act_shift()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for sel in model.selectors:
                sel.act_shift.copy_(torch.randn(sel.channels, generator=g) * shift_sd)
    return model.eval()


def _image(n: int = 2, size: int = 24) -> torch.Tensor:
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3)) * 255).round()


def test_models_have_no_shift_unless_asked_and_a_zero_shift_changes_nothing() -> None:
    model = _model()
    assert not model.act_shift and not any(k.endswith("act_shift") for k in model.state_dict())
    x = _image()
    with torch.inference_mode():
        before = {m: model(x)[0] for m in ("fp32", "w8a4", "dynamic") if set_quant_mode(model, m)}
        model.enable_act_shift()
        assert model.act_shift and sum(k.endswith(".act_shift") for k in model.state_dict()) == 32
        for m, out in before.items():
            set_quant_mode(model, m)
            assert torch.equal(model(x)[0], out), m


def test_a_selector_quantizes_its_shifted_input_and_fp32_adds_the_shift() -> None:
    model = _model(shift_sd=3.0)
    sel = model.body[0].bitsel1
    h = torch.randn(1, 64, 10, 10, generator=torch.Generator().manual_seed(1)) * 20
    t = sel.act_shift.detach().reshape(1, -1, 1, 1)
    ctx = QuantContext(grad=torch.zeros(1, 2, 1, 1))
    with torch.inference_mode():
        set_quant_mode(model, "fp32")
        assert torch.equal(sel(h, ctx), h + t)
        set_quant_mode(model, "w8a4")
        want = fake_quant_act(h + t, sel.quant_bit1.alpha, float(qmax_for_bits(4)), signed=True)
        assert torch.equal(sel(h, ctx), want) and not torch.equal(want, sel.quant_bit1.quantize(h, 4))
        set_quant_mode(model, "dynamic")  # the features read the unshifted input
        seen = []
        features = sel.features
        sel.features = lambda x, c: (seen.append(x), features(x, c))[1]  # type: ignore[method-assign]
        out = sel(h, QuantContext(grad=torch.zeros(1, 2, 1, 1)))
        assert len(seen) == 1 and torch.equal(seen[0], h)
        assert not torch.equal(out, sel.quant_bit1.quantize(h, 4))  # ... and the codes the shifted one


def test_shifts_change_the_output_and_survive_a_save_and_load(tmp_path) -> None:
    model, plain = _model(shift_sd=3.0), _model()
    x = _image(1, 20)
    path = tmp_path / "s.safetensors"
    save_weights(model, path)
    back = load_model_file(path)
    assert back.act_shift and back.act_grid == "relu-unsigned"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["act_shift"] == "channel"
    for mode in ("fp32", "dynamic"):
        for m in (model, back, plain):
            set_quant_mode(m, mode)
        with torch.inference_mode():
            out = model(x)[0]
            assert torch.equal(back(x)[0], out)
            assert not torch.equal(plain(x)[0], out)
    assert weights_digest(back) != weights_digest(plain)
    fresh = create_model("edsr", 2)  # a freshly built model takes such a state dict strictly
    fresh.load_state_dict(model.state_dict())
    assert fresh.act_shift


@pytest.mark.skipif(not int8_available(), reason="no exact int8 kernels on this CPU")
def test_integer_kernels_stay_exact_with_shifts() -> None:
    """The codes are those of x + t on the same grid: with random shifts on the shipped x4 model, the int8 path
    chooses the bits of float64 arithmetic (but for a decision at a boundary) and lands no further from it than the
    float32 path (tests/test_intconv.py's measure of exactness)."""
    from cadyq_cli.weights import load_model
    from tests.int8_reference import scene_crop, three_ways

    model = load_model("edsr-baseline", scale=4, mode="dynamic", kernels="float")
    model.enable_act_shift()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for sel in model.selectors:
            sel.act_shift.copy_(torch.randn(sel.channels, generator=g) * 2.0)
    r = three_ways(model, *scene_crop())
    bits_i, bits_f, bits64, err_f, err_i = r["bits_i"], r["bits_f"], r["bits64"], r["err_f"], r["err_i"]
    assert torch.equal(bits_f, bits64)
    # a selector whose features sit at a decision boundary may flip on the int8 path's one-ulp differences
    # (here 1 of 192 decisions flips)
    assert float((bits_i != bits_f).float().mean()) <= 0.01
    assert float((err_i > 0).double().mean()) <= float((err_f > 0).double().mean()) + 0.03
    assert float((err_i > 1).double().mean()) <= float((err_f > 1).double().mean()) + 0.005


def test_each_shift_learns_at_a_rate_in_units_of_its_own_4_bit_step() -> None:
    """--shift-lr is a fraction of the selector's 4-bit step: a signed residual input (alpha_4 / 7) gets a larger
    absolute rate than a ReLU output on the unsigned grid (alpha_4 / 15); the rates follow the clips as they train."""
    from cadyq_cli.train.config import TrainConfig
    from cadyq_cli.train.loop import _optimizer, set_shift_lrs

    model = _model()
    model.enable_act_shift()
    cfg = TrainConfig(stage="cadyq", shift_lr=0.05)
    opt = _optimizer(model, cfg)
    groups = {g["shift_of"]: g for g in opt.param_groups if "shift_of" in g}
    assert len(groups) == len(model.selectors) == 32
    for i, sel in enumerate(model.selectors):
        step4 = float(sel.quant_bit1.alpha.detach()) / (7 if sel.signed else 15)
        assert groups[i]["lr"] == pytest.approx(0.05 * step4) and groups[i]["params"][0] is sel.act_shift
    assert {model.selectors[i].signed for i in groups} == {True, False}
    with torch.no_grad():
        model.selectors[0].quant_bit1.alpha.mul_(2)
    set_shift_lrs(opt, model, cfg)
    assert groups[0]["lr"] == pytest.approx(0.05 * float(model.selectors[0].quant_bit1.alpha.detach()) / 7)
    shifts = {id(s.act_shift) for s in model.selectors}
    assert not any(id(p) in shifts for g in opt.param_groups if "shift_of" not in g for p in g["params"])
