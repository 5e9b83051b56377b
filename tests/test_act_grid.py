"""The relu-unsigned activation grid: ReLU inputs quantized on all 2**b levels of [0, alpha]."""
from __future__ import annotations

import pytest
import torch

from cadyq_cli.checkpoint import load_model_file, model_from_state_dict, save_weights
from cadyq_cli.errors import CheckpointMismatchError
from cadyq_cli.models import create_model
from cadyq_cli.quant.modules import set_quant_mode
from cadyq_cli.quant.modules import BitSelector
from cadyq_cli.quant.primitives import fake_quant_act, qmax_for_bits
from tests import official_reference as ref

def _model(arch: str = "edsr", grid: str = "relu-unsigned") -> torch.nn.Module:
    sd = ref.random_official_state_dict(arch, 2, "cadyq", seed=0)
    calib = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 255
    sd = ref.calibrate_alphas(sd, arch, 2, calib)
    model = model_from_state_dict(sd, arch, 2)
    model.set_act_grid(grid)
    return model.eval()


def _image(n: int = 2, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.rand(n, 3, size, size, generator=g) * 255).round()


def test_qmax_unsigned() -> None:
    assert [qmax_for_bits(b, signed=False) for b in (4, 6, 8)] == [15, 63, 255]
    assert [qmax_for_bits(b) for b in (4, 6, 8)] == [7, 31, 127]


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_unsigned_grid_uses_every_level_and_clips_to_zero(bits: int) -> None:
    x = torch.linspace(-2.0, 12.0, 20000).reshape(1, 1, 100, 200)
    a = torch.tensor([10.0])
    q = qmax_for_bits(bits, signed=False)
    got = fake_quant_act(x, a, float(q), signed=False)
    assert got.min() == 0 and got.max() == 10.0  # negatives clip to 0, beyond alpha to alpha
    assert len(got.unique()) == q + 1 == 2**bits
    codes = got / (10.0 / q)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    # on non-negative input it is the signed formula with the larger qmax
    pos = x.clamp_min(0)
    assert torch.equal(fake_quant_act(pos, a, float(q), signed=False), fake_quant_act(pos, a, float(q)))


def test_unsigned_grid_training_path_matches_inference_and_has_gradients() -> None:
    x = (torch.randn(2, 3, 5, 5) * 4).relu().requires_grad_(True)
    a = torch.tensor([3.0], requires_grad=True)
    y = fake_quant_act(x, a, 15.0, signed=False)
    with torch.no_grad():
        assert torch.equal(y, fake_quant_act(x.detach(), a.detach(), 15.0, signed=False))
    y.sum().backward()
    assert x.grad is not None and a.grad is not None and float(a.grad) != 0.0


@pytest.mark.parametrize("arch,n_unsigned", [("edsr", 16), ("carn", 9)])
def test_set_act_grid_switches_only_relu_inputs(arch: str, n_unsigned: int) -> None:
    model = _model(arch, "signed")
    assert model.act_grid == "signed" and all(s.signed for s in model.selectors)
    model.set_act_grid("relu-unsigned")
    assert [not s.signed for s in model.selectors].count(True) == n_unsigned
    assert all(s.after_relu != s.signed for s in model.selectors)
    assert [float(v) for v in next(s for s in model.selectors if not s.signed)._qmax_table] == [15.0, 63.0, 255.0]
    model.set_act_grid("signed")
    assert all(s.signed for s in model.selectors)
    with pytest.raises(ValueError, match="unknown activation grid"):
        model.set_act_grid("unsigned-everything")


def test_w8a4_relu_inputs_get_sixteen_levels() -> None:
    """What the conv after the ReLU reads: 16 levels on the unsigned grid, 8 on the signed one."""
    levels = {}
    for grid in ("signed", "relu-unsigned"):
        model = _model("edsr", grid)
        set_quant_mode(model, "w8a4")
        sel = model.body[3].body[2]
        seen: list[torch.Tensor] = []
        h = sel.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
        with torch.inference_mode():
            model(_image(1, 32))
        h.remove()
        levels[grid] = len(seen[0].unique())
    assert levels == {"signed": 8, "relu-unsigned": 16}


def test_unsigned_grid_changes_the_output_and_lowers_the_error() -> None:
    """Same weights and clips: the unsigned grid is a finer quantization of the ReLU inputs, so
    w8a4 lands closer to full precision."""
    x = _image(2, 24)
    model = _model("edsr", "signed")
    with torch.inference_mode():
        set_quant_mode(model, "fp32")
        ref_out = model(x)[0]
        set_quant_mode(model, "w8a4")
        signed = model(x)[0]
        model.set_act_grid("relu-unsigned")
        unsigned = model(x)[0]
    err_s = (signed - ref_out).pow(2).mean()
    err_u = (unsigned - ref_out).pow(2).mean()
    assert err_u < err_s


def test_act_grid_round_trips_through_safetensors(tmp_path) -> None:
    model = _model("edsr")
    path = tmp_path / "u.safetensors"
    save_weights(model, path)
    back = load_model_file(path)
    assert back.act_grid == "relu-unsigned"
    assert [s.signed for s in back.selectors] == [s.signed for s in model.selectors]
    x = _image(1, 20)
    with torch.inference_mode():
        assert torch.equal(back(x)[0], model(x)[0])
    # a signed model writes no act_grid (old files stay byte-identical) and loads signed
    model.set_act_grid("signed")
    save_weights(model, tmp_path / "s.safetensors")
    assert load_model_file(tmp_path / "s.safetensors").act_grid == "signed"


def test_unknown_act_grid_in_a_file_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    model = create_model("edsr_baseline", 2)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "x.safetensors"), metadata={"arch": "edsr_baseline", "scale": "2", "act_grid": "ternary"})
    with pytest.raises(CheckpointMismatchError, match="unknown activation grid 'ternary'"):
        load_model_file(tmp_path / "x.safetensors")


def test_selector_set_signed_keeps_device_and_candidates_in_step() -> None:
    sel = BitSelector(4)
    sel.set_signed(False)
    assert all(not q.signed for q in sel.candidates) and not sel.signed
    sel.set_signed(True)
    assert [float(v) for v in sel._qmax_table] == [7.0, 31.0, 127.0]


def test_fp_skip_adds_the_unquantized_block_input(tmp_path) -> None:
    """EDSR --skip fp: a block returns residual + its *unquantized* input; the convs read the same
    quantized tensor, so the bits do not change; the choice is recorded in the weights."""
    from cadyq_cli.quant.modules import QuantContext

    model = _model("edsr", "relu-unsigned")
    set_quant_mode(model, "w8a4")
    blk = model.body[2]
    h = torch.randn(1, 64, 12, 12, generator=torch.Generator().manual_seed(5)) * 10
    with torch.inference_mode():
        official = blk(h.clone(), QuantContext(grad=torch.zeros(1, 2, 1, 1)))
        quantized_input = blk.bitsel1(h.clone(), QuantContext(grad=torch.zeros(1, 2, 1, 1)))
        model.set_skip("fp")
        assert blk.fp_skip
        fp = blk(h.clone(), QuantContext(grad=torch.zeros(1, 2, 1, 1)))
    assert not torch.equal(h, quantized_input)
    assert torch.allclose(fp - official, h - quantized_input, atol=1e-4)
    x = _image(1, 20)
    with torch.inference_mode():
        on, bits_on = model(x)
        model.set_skip("official")
        off, bits_off = model(x)
        model.set_skip("fp")
    assert not torch.equal(on, off) and torch.equal(bits_on, bits_off)
    save_weights(model, tmp_path / "f.safetensors")
    back = load_model_file(tmp_path / "f.safetensors")
    assert back.skip == "fp" and back.act_grid == "relu-unsigned"
    set_quant_mode(back, "w8a4")
    with torch.inference_mode():
        assert torch.equal(back(x)[0], on)
    with pytest.raises(ValueError, match="offers the skips official, not 'fp'"):
        _model("carn").set_skip("fp")
