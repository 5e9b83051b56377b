"""Integer kernels: quantized convs on int8 codes give the fake-quantized float results."""
from __future__ import annotations


import pytest
import torch

from cadyq_cli.checkpoint import model_from_state_dict
from cadyq_cli.errors import CadyqError
from cadyq_cli.quant import intconv
from cadyq_cli.quant.intconv import int8_available, kernels_of, set_kernels
from cadyq_cli.quant.modules import set_quant_mode
from cadyq_cli.quant.modules import ActQuantizer, BitSelector, QuantConv2d, conv_forward
from cadyq_cli.quant.regions import RegionGrid
from cadyq_cli.quant.primitives import fake_quant_act, qmax_for_bits
from tests import official_reference as ref
from tests.int8_reference import scene_crop, three_ways

needs_int8 = pytest.mark.skipif(not int8_available(), reason="no exact int8 kernels on this CPU")


def _random_model(arch: str, scale: int = 4, seed: int = 0) -> torch.nn.Module:
    sd = ref.random_official_state_dict(arch, scale, "cadyq", seed=seed)
    calib = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(seed)) * 255
    sd = ref.calibrate_alphas(sd, arch, scale, calib)
    return model_from_state_dict(sd, arch, scale).eval()


def _input(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    base = 128 + 100 * torch.sin(xx[None, None] * torch.rand(n, 3, 1, 1, generator=g) + yy)  # content varies per sample
    return (base + torch.randn(n, 3, size, size, generator=g) * 20 * torch.rand(n, 1, 1, 1, generator=g)).clamp(0, 255)


@needs_int8
@pytest.mark.parametrize("arch,act_grid", [("edsr", "signed"), ("carn", "signed"), ("srresnet", "signed"), ("idn", "signed"),
                                       ("edsr", "relu-unsigned"), ("carn", "relu-unsigned")])
@pytest.mark.parametrize("mode", ["w8a8", "w8a4", "dynamic"])
@pytest.mark.parametrize("regions", [False, True])
def test_every_int8_conv_matches_the_float_conv(arch: str, act_grid: str, mode: str, regions: bool) -> None:
    """On the very same quantized input, the integer conv equals the fake-quantized float conv
    to float32 rounding, for every quantized conv the integer path takes (on the relu-unsigned
    grid, for the uint8 codes of the unsigned quantizers too)."""
    model = _random_model(arch)
    model.set_act_grid(act_grid)
    set_quant_mode(model, mode)
    assert set_kernels(model, "int8") == "int8"
    x = _input(3, 24)
    grid = RegionGrid.uniform(24, 24, 8) if regions else None
    checked: list[float] = []
    unsigned_seen = []

    def pre(conv: QuantConv2d, inp: tuple) -> None:
        q = getattr(inp[0], "_cadyq_codes", None)
        if q is None:
            return
        want = conv_forward(conv, inp[0], conv.quantized_weight())
        got = conv.int8_forward(q)
        assert got.shape == want.shape
        checked.append(float((got - want).abs().max() / want.abs().max().clamp_min(1e-3)))
        unsigned_seen.append(not q.signed)

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules() if isinstance(m, QuantConv2d)]
    with torch.inference_mode():
        model(x, grid)
    for h in hooks:
        h.remove()
    n_quant_convs = sum(isinstance(m, QuantConv2d) for m in model.modules())
    assert len(checked) >= n_quant_convs // 2 > 0  # the integer path is really taken
    assert any(unsigned_seen) == (act_grid != "signed")
    assert max(checked) < 2e-6


@needs_int8
@pytest.mark.parametrize("mode", ["w8a6", "dynamic"])
def test_emitting_quantizers_return_the_same_floats(mode: str) -> None:
    """Attaching codes does not change the float values the rest of the network reads."""
    model = _random_model("edsr")
    set_quant_mode(model, mode)
    set_kernels(model, "int8")
    linked = [m for m in model.modules() if isinstance(m, (BitSelector, ActQuantizer)) and m.emit_codes]
    outs: dict[str, list[torch.Tensor]] = {"float": [], "int8": []}
    for kernels in outs:
        set_kernels(model, kernels)
        hooks = [m.register_forward_hook(lambda m, i, o, k=kernels: outs[k].append(o.clone())) for m in linked]
        with torch.inference_mode():
            model(_input(2, 20)[:1])  # the first quantizer sees identical input on both paths
        for h in hooks:
            h.remove()
    assert torch.equal(outs["float"][0], outs["int8"][0])


@needs_int8
def test_codes_reproduce_fake_quant() -> None:
    q = ActQuantizer(4, alpha=3.0)
    q.eval()
    q.emit_codes = True
    x = torch.randn(2, 8, 5, 6) * 3
    with torch.inference_mode():
        out = q(x.clone())
    codes = out._cadyq_codes
    assert codes.i8.is_contiguous(memory_format=torch.channels_last)
    assert codes.i8.abs().max() <= qmax_for_bits(4)
    assert torch.equal(out, fake_quant_act(x, q.alpha.detach(), 7.0))
    assert torch.allclose(codes.i8.float() * codes.steps[0], out, atol=1e-6)


@needs_int8
@pytest.mark.parametrize("skip", ["official", "fp"])
def test_int8_is_as_close_to_exact_arithmetic_as_float32(skip: str) -> None:
    """End to end on the shipped model: the float32 fake-quantized path and the int8 path both
    differ from the same semantics in float64 where a rounding flips; the int8 path no more.

    With the fp block skip (the shipped x4) nothing re-quantizes the residual stream, so the int8 path's
    rescale (oneDNN multiplies the int32 sums by the float32 product of the two steps: one systematic
    rounding per layer) drifts through all 16 blocks: a few percent more output pixels land one level off
    than with the float32 path, never more pixels two levels off."""
    from cadyq_cli.weights import load_model

    model = load_model("edsr-baseline", scale=4, mode="dynamic", kernels="float")
    model.set_skip(skip)
    r = three_ways(model, *scene_crop())
    bits_i, bits_f, bits64, err_f, err_i = r["bits_i"], r["bits_f"], r["bits64"], r["err_f"], r["err_i"]
    assert torch.equal(bits_i, bits_f) and torch.equal(bits_f, bits64)
    off_by_one = 0.01 if skip == "official" else 0.03
    assert float((err_i > 0).double().mean()) <= float((err_f > 0).double().mean()) + off_by_one
    assert float((err_i > 1).double().mean()) <= float((err_f > 1).double().mean()) + 0.005


def test_kernel_choice_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_model("edsr", seed=3)
    assert kernels_of(model) == "float"
    assert set_kernels(model, "float") == "float"
    assert not any(getattr(m, "emit_codes", False) for m in model.modules())
    with pytest.raises(CadyqError, match="auto, int8 or float"):
        set_kernels(model, "fast")
    monkeypatch.setattr(intconv, "int8_available", lambda: False)
    assert set_kernels(model, "auto") == "float"
    with pytest.raises(CadyqError, match="not available"):
        set_kernels(model, "int8")


@needs_int8
def test_int8_links_only_quantizers_that_feed_quantized_convs() -> None:
    model = _random_model("edsr")
    set_kernels(model, "int8")
    linked = {n for n, m in model.named_modules() if getattr(m, "emit_codes", False)}
    assert linked == {f"body.{i}.bitsel1" for i in range(16)} | {f"body.{i}.body.2" for i in range(16)}
    srres = _random_model("srresnet")
    set_kernels(srres, "int8")
    linked = {n for n, m in srres.named_modules() if getattr(m, "emit_codes", False)}
    assert all(n.endswith("classify2") for n in linked)  # classify1 feeds only the skip path


@needs_int8
def test_training_and_autograd_never_use_codes() -> None:
    model = _random_model("edsr")
    set_quant_mode(model, "w8a8")
    set_kernels(model, "int8")
    model.train()
    x = _input(1, 16)
    sr, _ = model(x)
    sr.mean().backward()  # the float path (STE) runs: gradients reach the weights
    assert model.body[0].body[0].weight.grad is not None
