"""Quantization: primitive formulas, the bit selector, region maps, batching, BitOPs and FAB.

The formulas are checked against plain hand-written expressions with ``torch.equal`` (spec §4),
the selector against crafted ``net_small`` heads whose choices are known (spec §5), and the cost
accounting against MAC counts computed by hand from the layer shapes.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from cadyq_cli.checkpoint import model_from_state_dict
from cadyq_cli.engine import TilingConfig, upscale_array
from cadyq_cli.models import create_model, grad_feature
from cadyq_cli.models._base import SRModel
from cadyq_cli.quant import (
    ActQuantizer,
    BitSelector,
    QuantContext,
    QuantConv2d,
    RegionGrid,
    fake_quant_act,
    fake_quant_weight,
    qmax_for_bits,
    set_quant_mode,
)
from cadyq_cli.quant.cost import bitops, cost_table, fab
from cadyq_cli.quant.regions import region_mean, region_std

try:
    from tests import official_reference as ref
except ImportError:  # tests/ itself on sys.path (pytest prepend mode)
    import official_reference as ref  # type: ignore[no-redef]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- primitives


def test_qmax_for_bits() -> None:
    assert [qmax_for_bits(b) for b in (2, 4, 6, 8)] == [1, 7, 31, 127]


def test_weight_quant_formula() -> None:
    w = torch.randn(16, 8, 3, 3, generator=_gen(0)) * 0.3
    m = w.abs().max() + 1e-8
    expected = torch.round(w * 127 / m) * m / 127
    got = fake_quant_weight(w)
    assert torch.equal(got, expected)
    codes = torch.round(got * 127 / m)
    assert codes.abs().max() == 127 and len(codes.unique()) <= 255
    # 4-bit weights: 7 levels per side
    m4 = w.abs().max() + 1e-8
    assert torch.equal(fake_quant_weight(w, 4), torch.round(w * 7 / m4) * m4 / 7)


def test_weight_quant_of_zero_weight_is_zero() -> None:
    w = torch.zeros(4, 4, 3, 3)
    assert torch.equal(fake_quant_weight(w), w)


def _hand_act(x: torch.Tensor, a: float, bits: int) -> torch.Tensor:
    q = 2 ** (bits - 1) - 1
    at = torch.tensor([a])
    c = torch.where(x > at, at, torch.where(x < -at, -at, x))
    return torch.round(c / at * q) / q * at


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_act_quant_formula(bits: int) -> None:
    x = torch.randn(2, 5, 7, 9, generator=_gen(bits)) * 6
    a = 4.3
    got = fake_quant_act(x, torch.tensor([a]), float(qmax_for_bits(bits)))
    assert torch.equal(got, _hand_act(x, a, bits))
    # clip: everything beyond +-alpha lands exactly on +-alpha
    assert torch.equal(got[x >= a], torch.full_like(got[x >= a], a))
    assert torch.equal(got[x <= -a], torch.full_like(got[x <= -a], -a))
    # the ActQuantizer module computes the same thing with its own alpha
    q = ActQuantizer(bits, alpha=a)
    with torch.no_grad():
        assert torch.equal(q(x), got)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_act_quant_signed_grid_for_nonnegative_input(bits: int) -> None:
    """Non-negative inputs use the signed grid: qmax + 1 levels on [0, alpha], not 2**bits."""
    x = torch.rand(1, 4, 16, 16, generator=_gen(10 + bits)) * 12  # >= 0, some above alpha
    a = 10.0
    qmax = qmax_for_bits(bits)
    got = fake_quant_act(x, torch.tensor([a]), float(qmax))
    assert torch.equal(got, _hand_act(x, a, bits))
    step = a / qmax
    codes = got / step
    assert torch.allclose(codes, torch.round(codes), atol=1e-4)
    assert len(got.unique()) == qmax + 1  # 0 .. qmax: dense input hits every level
    assert got.min() >= 0 and got.max() == a


def test_act_quant_rounds_half_to_even() -> None:
    x = torch.tensor([0.25, 0.75, -0.25, -0.75])
    # x / 1 * 2 = 0.5, 1.5, -0.5, -1.5 -> 0, 2, -0, -2 -> / 2 * 1
    assert torch.equal(fake_quant_act(x, torch.tensor([1.0]), 2.0), torch.tensor([0.0, 1.0, -0.0, -1.0]))


def test_act_quant_broadcast_per_sample_and_per_pixel() -> None:
    x = torch.randn(3, 2, 5, 6, generator=_gen(3)) * 5
    alphas = torch.tensor([2.0, 3.0, 4.0])
    bits = [4, 6, 8]
    qmax = torch.tensor([float(qmax_for_bits(b)) for b in bits])
    got = fake_quant_act(x, alphas.view(3, 1, 1, 1), qmax.view(3, 1, 1, 1))
    for i in range(3):
        assert torch.equal(got[i : i + 1], _hand_act(x[i : i + 1], float(alphas[i]), bits[i]))
    # a per-pixel step map (left half 4 bits with alpha 2, right half 8 bits with alpha 4)
    amap = torch.full((1, 1, 5, 6), 2.0)
    amap[..., 3:] = 4.0
    qmap = torch.full((1, 1, 5, 6), 7.0)
    qmap[..., 3:] = 127.0
    got = fake_quant_act(x[:1], amap, qmap)
    assert torch.equal(got[..., :3], _hand_act(x[:1, :, :, :3], 2.0, 4))
    assert torch.equal(got[..., 3:], _hand_act(x[:1, :, :, 3:], 4.0, 8))


def test_quant_conv_uses_cached_8bit_weight() -> None:
    conv = QuantConv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(1, 4, 8, 8, generator=_gen(4))
    with torch.no_grad():
        y = conv(x)
        assert torch.equal(y, nn.functional.conv2d(x, fake_quant_weight(conv.weight), conv.bias, padding=1))
        conv.weight.mul_(2.0)  # in-place change invalidates the cache
        assert torch.equal(conv(x), nn.functional.conv2d(x, fake_quant_weight(conv.weight), conv.bias, padding=1))
        set_quant_mode(conv, "fp32")
        assert torch.equal(conv(x), nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))


# --------------------------------------------------------------------------- selector


def _selector(channels: int, weight: torch.Tensor, bias: tuple[float, float, float],
              alphas: tuple[float, float, float] = (3.0, 5.0, 7.0)) -> BitSelector:
    sel = BitSelector(channels).eval()
    with torch.no_grad():
        sel.net_small[0].weight.copy_(weight)
        sel.net_small[0].bias.copy_(torch.tensor(bias))
        for q, a in zip(sel.candidates, alphas):
            q.alpha.fill_(a)
    return sel


@pytest.mark.parametrize(("bias", "bits"), [((1.0, 0.0, 0.0), 4), ((0.0, 1.0, 0.0), 6), ((0.0, 0.0, 1.0), 8),
                                            ((0.0, 0.0, 0.0), 4), ((0.0, 2.0, 2.0), 6)])
def test_selector_bias_only(bias: tuple[float, float, float], bits: int) -> None:
    """Zero weight: the bias decides; ties go to the first maximum (torch.argmax)."""
    c = 6
    sel = _selector(c, torch.zeros(3, c + 2), bias)
    x = torch.randn(2, c, 9, 9, generator=_gen(5)) * 6
    ctx = QuantContext(grad=torch.rand(2, 2, 1, 1) * 50)
    with torch.no_grad():
        y = sel(x, ctx)
    assert len(ctx.bits) == 1 and torch.equal(ctx.bits[0], torch.full((2, 1, 1), float(bits)))
    k = (4, 6, 8).index(bits)
    assert torch.equal(y, _hand_act(x, (3.0, 5.0, 7.0)[k], bits))


def test_selector_fixed_modes_use_their_own_candidate() -> None:
    c = 4
    sel = _selector(c, torch.zeros(3, c + 2), (0.0, 0.0, 1.0))
    x = torch.randn(1, c, 6, 6, generator=_gen(6)) * 6
    for mode, bits, alpha in (("w8a4", 4, 3.0), ("w8a6", 6, 5.0), ("w8a8", 8, 7.0)):
        set_quant_mode(sel, mode)
        ctx = QuantContext(grad=torch.zeros(1, 2, 1, 1))
        with torch.no_grad():
            assert torch.equal(sel(x, ctx), _hand_act(x, alpha, bits))
        assert torch.equal(ctx.bits[0], torch.full((1, 1, 1), float(bits)))
    set_quant_mode(sel, "fp32")
    ctx = QuantContext(grad=torch.zeros(1, 2, 1, 1))
    assert torch.equal(sel(x, ctx), x) and ctx.bits == []


def test_selector_std_feature() -> None:
    """A weight on the std features: a constant input picks 4 bits, a varied one 6 bits."""
    c = 5
    w = torch.zeros(3, c + 2)
    w[1, 2:] = 1.0  # logit of 6 bits = sum of channel stds
    sel = _selector(c, w, (0.5, 0.0, 0.0))
    flat = torch.full((1, c, 8, 8), 2.0)
    varied = torch.randn(1, c, 8, 8, generator=_gen(7))
    ctx = QuantContext(grad=torch.zeros(2, 2, 1, 1))
    with torch.no_grad():
        sel(torch.cat([flat, varied]), ctx)
    assert ctx.bits[0].flatten().tolist() == [4.0, 6.0]


def _small_edsr() -> SRModel:
    torch.manual_seed(0)
    return create_model("edsr", 2, n_resblocks=2, n_feats=8).eval()  # type: ignore[return-value]


def test_selector_gradient_feature_in_a_model() -> None:
    """Weight on g_x: a flat image picks 4 bits at every selector, a textured one 8 bits."""
    model = _small_edsr()
    for sel in model.selectors:
        w = torch.zeros(3, sel.channels + 2)
        w[2, 0] = 1.0  # logit of 8 bits = g_x (x1000 in EDSR)
        with torch.no_grad():
            sel.net_small[0].weight.copy_(w)
            sel.net_small[0].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    set_quant_mode(model, "dynamic")
    flat = torch.tensor([120.0, 90.0, 60.0]).view(1, 3, 1, 1).expand(1, 3, 12, 12).contiguous()
    stripes = flat.clone()
    stripes[..., ::2] = 250.0  # vertical stripes: large horizontal gradient
    with torch.no_grad():
        _, bits = model(torch.cat([flat, stripes]))
    assert bits.shape == (2, 4)
    assert bits[0].tolist() == [4.0] * 4 and bits[1].tolist() == [8.0] * 4


def test_official_fresh_head_picks_8_bits() -> None:
    """The official constructor init (weights 1, bias (0,0,1)) always picks 8 bits."""
    model = _small_edsr()
    with torch.no_grad():
        _, bits = model(torch.rand(2, 3, 10, 10, generator=_gen(8)) * 255)
    assert bool((bits == 8).all())


# --------------------------------------------------------------------------- region maps


def test_region_mean_and_std_match_per_region_torch() -> None:
    x = torch.randn(2, 3, 13, 11, generator=_gen(9)) * 4 + 1
    rows, cols = [0, 5, 13], [0, 7, 9, 11]
    grid = RegionGrid.from_bounds(rows, cols)
    assert grid.shape == (2, 3)
    m, s = region_mean(x, grid), region_std(x, grid)
    assert m.shape == s.shape == (2, 3, 2, 3)
    for i in range(2):
        for j in range(3):
            part = x[:, :, rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
            torch.testing.assert_close(m[:, :, i, j], part.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s[:, :, i, j], part.std(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    assert grid.counts().tolist() == [[35.0, 10.0, 10.0], [56.0, 16.0, 16.0]]


def test_region_std_of_single_pixel_region_is_zero() -> None:
    x = torch.randn(1, 2, 4, 5, generator=_gen(10))
    s = region_std(x, RegionGrid.from_bounds([0, 1, 4], [0, 1, 5]))
    assert torch.equal(s[:, :, 0, 0], torch.zeros(1, 2))


def test_grad_feature_per_region() -> None:
    x = torch.rand(1, 3, 12, 16, generator=_gen(11))
    grid = RegionGrid.uniform(12, 16, 6)
    g = grad_feature(x, grid)
    assert g.shape == (1, 2, 2, 3)
    # whole-image |Sobel| maps (replicate padding), averaged per region
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
    pad = nn.functional.pad(gray, (1, 1, 1, 1), mode="replicate")
    maps = nn.functional.conv2d(pad, torch.stack([kx, kx.T]).unsqueeze(1)).abs()
    for i, (r0, r1) in enumerate(((0, 6), (6, 12))):
        for j, (c0, c1) in enumerate(((0, 6), (6, 12), (12, 16))):
            torch.testing.assert_close(g[0, :, i, j], maps[0, :, r0:r1, c0:c1].mean(dim=(1, 2)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_feature(x)[0, :, 0, 0], ref.gradient_feature(x)[0], rtol=1e-5, atol=1e-7)


def test_selector_on_2x2_regions_equals_per_quadrant_runs() -> None:
    """Region bits and per-region quantization equal running the selector on each quadrant."""
    c = 6
    w = torch.zeros(3, c + 2)
    w[1, 2:] = 1.0  # logit of 6 bits: sum of channel stds
    w[2, 0] = 1.0  # logit of 8 bits: g_x
    sel = _selector(c, w, (2.0, 0.0, 0.0))
    gen = _gen(13)
    quads = [torch.randn(1, c, 7, 9, generator=gen) * s + s for s in (0.1, 1.0, 3.0, 10.0)]
    x = torch.cat([torch.cat(quads[:2], dim=3), torch.cat(quads[2:], dim=3)], dim=2)  # (1, c, 14, 18)
    # logits per quadrant ~ (2, 0.6, 0), (2, 6, 0), (2, 18, 30), (2, 60, 1): 4, 6, 8, 6 bits
    grads = torch.tensor([[0.0, 0.0], [0.0, 0.0], [30.0, 2.0], [1.0, 40.0]])
    grid = RegionGrid.from_bounds([0, 7, 14], [0, 9, 18])
    ctx = QuantContext(grad=grads.T.reshape(1, 2, 2, 2), grid=grid)
    with torch.no_grad():
        y = sel(x, ctx)
    got = ctx.bits[0][0]  # (2, 2)
    seen = []
    for k, q in enumerate(quads):
        i, j = divmod(k, 2)
        cq = QuantContext(grad=grads[k].view(1, 2, 1, 1))
        with torch.no_grad():
            yq = sel(q, cq)
        assert float(got[i, j]) == float(cq.bits[0])
        assert torch.equal(y[:, :, 7 * i : 7 * i + 7, 9 * j : 9 * j + 9], yq)
        seen.append(float(got[i, j]))
    assert seen == [4.0, 6.0, 8.0, 6.0]


def _calibrated_model(arch: str, scale: int, seed: int = 5) -> SRModel:
    sd = ref.random_official_state_dict(arch, scale, "cadyq", seed=seed)
    calib = torch.cat([torch.rand(1, 3, 16, 16, generator=_gen(20)) * 255,
                       torch.linspace(40, 200, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16)])
    sd = ref.calibrate_alphas(sd, arch, scale, calib)
    model = model_from_state_dict(sd, arch, scale)
    set_quant_mode(model, "dynamic")
    return model


def _mixed_batch(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """n patches from flat to noisy, so the selectors choose differently."""
    gen = _gen(seed)
    base = torch.linspace(60, 190, w).view(1, 1, 1, w).expand(n, 3, h, w)
    noise = torch.rand(n, 3, h, w, generator=gen) * 255 - 128
    amount = torch.linspace(0.0, 1.0, n).view(n, 1, 1, 1)
    return (base + amount * noise).clamp(0, 255).round()


def test_one_region_grid_equals_per_patch_path() -> None:
    model = _calibrated_model("edsr", 2)
    x = _mixed_batch(2, 14, 18, seed=21)
    grid = RegionGrid.from_bounds([0, 14], [0, 18])
    with torch.inference_mode():
        y0, b0 = model(x)
        y1, b1 = model(x, grid)
    assert b1.shape == (2, 32, 1, 1)
    assert torch.equal(b1[:, :, 0, 0], b0)
    assert torch.equal(y1, y0)
    assert len(b0.unique()) > 1


@pytest.mark.parametrize(("arch", "hw"), [("edsr", 26), ("carn", 26), ("srresnet", 26), ("idn", 26), ("edsr", 12), ("idn", 20)])
def test_batched_forward_equals_single_forwards(arch: str, hw: int) -> None:
    """N = 4 patches in one call give each patch exactly its batch-1 bits and output.

    26 px runs the whole batch at once; 12 and 20 px are below PyTorch's native-conv threshold
    for batch 1 (64 resp. 32 channels), where the model must run the patches one by one.
    """
    model = _calibrated_model(arch, 2)
    x = _mixed_batch(4, hw, hw, seed=22)
    with torch.inference_mode():
        y, b = model(x)
        singles = [model(x[i : i + 1]) for i in range(4)]
    for i, (yi, bi) in enumerate(singles):
        assert torch.equal(b[i : i + 1], bi)
        assert (y[i : i + 1] - yi).abs().max() <= 1e-4
    assert len(b.unique()) > 1


def test_batched_forward_with_region_grid() -> None:
    model = _calibrated_model("carn", 2)
    x = _mixed_batch(3, 24, 24, seed=23)
    grid = RegionGrid.uniform(24, 24, 12)
    with torch.inference_mode():
        y, b = model(x, grid)
        singles = [model(x[i : i + 1], grid) for i in range(3)]
    assert b.shape == (3, 18, 2, 2)
    for i, (yi, bi) in enumerate(singles):
        assert torch.equal(b[i : i + 1], bi)
        assert (y[i : i + 1] - yi).abs().max() <= 1e-4


# --------------------------------------------------------------------------- BitOPs and FAB


class _Toy(nn.Module):
    """FP conv -> selector -> 8-bit conv -> fixed Q8 -> 8-bit 1x1 conv -> 8-bit grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.fp = nn.Conv2d(3, 4, 3, padding=1)
        self.sel = BitSelector(4)
        self.q1 = QuantConv2d(4, 5, 3, padding=1)
        self.act = ActQuantizer(8)
        self.q2 = QuantConv2d(5, 2, 1)
        self.q3 = QuantConv2d(2, 2, 3, padding=1, groups=2)  # input not quantized: 8 x 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx = QuantContext(grad=torch.zeros(x.shape[0], 2, 1, 1))
        return self.q3(self.q2(self.act(self.q1(self.sel(self.fp(x), ctx)))))


def test_cost_table_and_bitops_toy() -> None:
    toy = _Toy().eval()
    table = cost_table(toy)
    rows = {c.name: (c.macs_per_px, c.weight_bits, c.act_selector, c.act_bits) for c in table}
    assert rows == {
        "fp": (4 * 3 * 9, 32, None, 32),
        "q1": (5 * 4 * 9, 8, 0, 8),
        "q2": (2 * 5 * 1, 8, None, 8),
        "q3": (2 * 1 * 9, 8, None, 32),
    }
    px = torch.tensor([100.0, 30.0])  # two regions
    rb = torch.tensor([[4.0], [6.0]])
    fixed = 108 * 32 * 32 + 10 * 8 * 8 + 18 * 8 * 32
    expected = 100 * (fixed + 180 * 8 * 4) + 30 * (fixed + 180 * 8 * 6)
    assert bitops(table, px, rb) == expected
    assert bitops(table, px, None, 6) == 130 * (fixed + 180 * 8 * 6)
    assert bitops(table, px, None, 32) == 130 * (108 + 180 + 10 + 18) * 32 * 32
    assert fab(rb) == 5.0


def test_edsr_bitops_and_fab_by_hand() -> None:
    """EDSR-baseline x2 on 10x10 LR: BitOPs from the layer shapes and the reported bits."""
    model = _calibrated_model("edsr", 2)
    rgb = _mixed_batch(1, 10, 10, seed=24)[0].permute(1, 2, 0).numpy().astype(np.float32)
    _, rep = upscale_array(model, rgb, TilingConfig("whole"))
    bits = rep.regions[0].bits
    assert len(bits) == 32 and len(set(bits)) > 1
    px = 100
    fp_macs = 3 * 64 * 9 + 64 * 64 * 9 + 64 * 256 * 9 + 64 * 3 * 9 * 4  # head, body.16, tail.0.0, tail.1 (HR)
    body = 64 * 64 * 9
    expected = px * (fp_macs * 32 * 32 + sum(body * 8 * b for b in bits))
    assert rep.bitops == pytest.approx(expected, rel=1e-12)
    assert rep.bitops_fp32 == pytest.approx(px * (fp_macs + 32 * body) * 32 * 32, rel=1e-12)
    assert rep.fab == pytest.approx(sum(bits) / 32)
    assert rep.regions[0].fab == pytest.approx(sum(bits) / 32)
    # w8a8: every selector at 8 bits
    set_quant_mode(model, "w8a8")
    _, rep8 = upscale_array(model, rgb, TilingConfig("whole"))
    assert rep8.bitops == pytest.approx(px * (fp_macs * 32 * 32 + 32 * body * 8 * 8), rel=1e-12)
    assert rep8.fab == 8.0


def test_image_fab_is_mean_over_patches() -> None:
    model = _calibrated_model("edsr", 2)
    rgb = _mixed_batch(1, 24, 30, seed=25)[0].permute(1, 2, 0).numpy().astype(np.float32)
    rgb[:, 15:] = np.random.default_rng(0).integers(0, 256, size=(24, 15, 3))
    _, rep = upscale_array(model, rgb, TilingConfig("paper", tile=14, overlap=4))
    per_patch = [float(np.mean(r.bits)) for r in rep.regions]
    assert len(per_patch) == 4 and len(set(per_patch)) > 1
    assert rep.fab == pytest.approx(float(np.mean(per_patch)))
    assert rep.bits_histogram == {str(b): sum(r.bits.count(b) for r in rep.regions) for b in (4, 6, 8)}
