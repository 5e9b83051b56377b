"""Backbones: official key sets and parameter counts (spec §3), forward contract, PAMS import (spec §2.3)."""
from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from cadyq_cli.errors import CheckpointMismatchError, UnsupportedScaleError
from cadyq_cli.models import create_model, get_arch, list_archs
from cadyq_cli.models import carn, edsr, idn, srresnet
from cadyq_cli.models._base import SRModel
from cadyq_cli.quant import BitSelector, set_quant_mode

# spec §3 counts table: arch -> scale -> (state_dict entries, unique parameters)
CADYQ_COUNTS: dict[str, dict[int, tuple[int, int]]] = {
    "edsr_baseline": {2: (364, 1_376_427), 3: (364, 1_561_067), 4: (366, 1_524_139)},
    "carn": {2: (220, 1_595_635), 3: (220, 1_595_635), 4: (220, 1_595_635)},
    "srresnet": {2: (511, 1_407_898), 4: (513, 1_555_355)},
    "idn": {2: (262, 594_853), 3: (262, 594_853), 4: (262, 594_853)},
}
PAMS_ENTRIES: dict[str, dict[int, int]] = {
    "edsr_baseline": {2: 204, 3: 204, 4: 206},
    "carn": {2: 148, 3: 148, 4: 148},
    "srresnet": {2: 319, 4: 321},
    "idn": {2: 166, 3: 166, 4: 166},
}
N_SELECTORS = {"edsr_baseline": 32, "carn": 18, "srresnet": 32, "idn": 24}
N_FEATURE_BLOCKS = {"edsr_baseline": 16, "carn": 9, "srresnet": 16, "idn": 4}
CASES = [(a, s) for a in CADYQ_COUNTS for s in CADYQ_COUNTS[a]]


_MODELS: dict[tuple[str, int], SRModel] = {}


def _model(arch: str, scale: int) -> SRModel:
    """A fresh-weights model in eval mode, built once per (arch, scale) for the module."""
    if (arch, scale) not in _MODELS:
        torch.manual_seed(0)
        _MODELS[(arch, scale)] = create_model(arch, scale).eval()  # type: ignore[assignment]
    return _MODELS[(arch, scale)]


def test_registry_lists_all_four() -> None:
    assert set(list_archs()) == set(CADYQ_COUNTS)


@pytest.mark.parametrize(("arch", "scale"), CASES)
def test_key_and_parameter_counts(arch: str, scale: int) -> None:
    m = _model(arch, scale)
    entries, params = CADYQ_COUNTS[arch][scale]
    assert len(m.state_dict()) == entries
    assert sum(p.numel() for p in m.parameters()) == params
    assert m.n_selectors == N_SELECTORS[arch]
    assert len(m.feature_blocks()) == N_FEATURE_BLOCKS[arch]
    assert m.receptive_radius > 0


def test_srresnet_x3_rejected() -> None:
    with pytest.raises(UnsupportedScaleError):
        create_model("srresnet", 3)


@pytest.mark.parametrize(("arch", "scale"), CASES)
def test_forward_modes(arch: str, scale: int) -> None:
    m = _model(arch, scale)
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 255
    outs = {}
    for mode in ("fp32", "w8a8", "w8a4", "dynamic"):
        set_quant_mode(m, mode)
        with torch.no_grad():
            sr, bits = m(x)
        assert sr.shape == (2, 3, 12 * scale, 12 * scale)
        assert torch.isfinite(sr).all()
        assert bits.shape == (2, 0 if mode == "fp32" else N_SELECTORS[arch])
        outs[mode] = (sr, bits)
    assert (outs["w8a4"][1] == 4).all()
    # fresh selectors (weight 1, bias (0, 0, 1)) pick 8 bits everywhere: identical to w8a8
    assert (outs["dynamic"][1] == 8).all()
    assert torch.equal(outs["dynamic"][0], outs["w8a8"][0])
    assert not torch.equal(outs["w8a4"][0], outs["w8a8"][0])
    set_quant_mode(m, "dynamic")


def test_aliases_share_tensors() -> None:
    sd = _model("srresnet", 4).state_dict()
    ptr = sd["head.1.weight"].data_ptr()
    assert all(sd[f"body.{i}.act.weight"].data_ptr() == ptr for i in range(16))
    sd = _model("idn", 4).state_dict()
    assert sd["fblock.module.0.alpha"].data_ptr() == sd["fblock.quant_actf1.alpha"].data_ptr()
    assert sd["fblock.module.3.max_val"].data_ptr() == sd["fblock.quant_actf2.max_val"].data_ptr()


def test_carn_scale_switch_uses_one_state_dict() -> None:
    m = create_model("carn", 2).eval()
    set_quant_mode(m, "fp32")
    x = torch.rand(1, 3, 6, 6) * 255
    for s in (2, 3, 4):
        m.scale = s
        with torch.no_grad():
            assert m(x)[0].shape == (1, 3, 6 * s, 6 * s)


@pytest.mark.parametrize("arch", list(CADYQ_COUNTS))
def test_receptive_radius_bounds_influence(arch: str) -> None:
    """In fp32 a change at LR column 0 leaves HR columns beyond (radius + 1) * scale untouched."""
    scale = 2
    m = _model(arch, scale)
    set_quant_mode(m, "fp32")
    r = m.receptive_radius
    x = torch.rand(1, 3, 4, r + 4, generator=torch.Generator().manual_seed(2)) * 255
    x2 = x.clone()
    x2[..., 0] = 255 - x2[..., 0]
    with torch.no_grad():
        d = (m(x)[0] - m(x2)[0]).abs()
    set_quant_mode(m, "dynamic")
    assert d[..., : scale].max() > 1e-3
    assert d[..., (r + 1) * scale :].max() < 1e-3


# ---- PAMS -> CADyQ (spec §2.3) -----------------------------------------------------------


def _pams_names_edsr(sel: str) -> list[str]:
    i = re.fullmatch(r"body\.(\d+)\.(bitsel1|body\.2)", sel)
    assert i is not None
    return [f"body.{i[1]}.quant_act1"] if i[2] == "bitsel1" else [f"body.{i[1]}.quant_act2", sel]


def _pams_names_carn(sel: str) -> list[str]:
    i = re.fullmatch(r"(b\d\.b\d)\.body\.(0|3)", sel)
    assert i is not None
    return [sel, f"{i[1]}.quant_act{1 if i[2] == '0' else 2}"]


def _pams_names_srresnet(sel: str) -> list[str]:
    i = re.fullmatch(r"body\.(\d+)\.classify(1|2)", sel)
    assert i is not None
    return [f"body.{i[1]}.quant_act{i[2]}"]


def _pams_names_idn(sel: str) -> list[str]:
    i = re.fullmatch(r"(dblocks\.\d+)\.enhancement_(top|bottom)\.(0|3|6)", sel)
    assert i is not None
    k = (0 if i[2] == "top" else 3) + int(i[3]) // 3 + 1
    return [sel, f"{i[1]}.quant_act{k}"]


PAMS_NAMES: dict[str, tuple[Callable[[str], list[str]], object]] = {
    "edsr_baseline": (_pams_names_edsr, edsr),
    "carn": (_pams_names_carn, carn),
    "srresnet": (_pams_names_srresnet, srresnet),
    "idn": (_pams_names_idn, idn),
}


def _to_pams(m: SRModel, names: Callable[[str], list[str]]) -> dict[str, torch.Tensor]:
    """Official PAMS layout of m: each selector becomes a fixed Q_8 (its 8-bit candidate)."""
    sd = m.state_dict()
    sels = [n for n, mod in m.named_modules() if isinstance(mod, BitSelector)]
    out = {k: v for k, v in sd.items() if not any(k.startswith(s + ".") for s in sels)}
    for s in sels:
        for name in names(s):
            for leaf in ("alpha", "max_val"):
                out[f"{name}.{leaf}"] = sd[f"{s}.quant_bit3.{leaf}"]
    return out


@pytest.mark.parametrize(("arch", "scale"), [(a, 4) for a in CADYQ_COUNTS] + [("srresnet", 2), ("edsr_baseline", 3)])
def test_pams_to_cadyq_loads_strictly(arch: str, scale: int) -> None:
    names, mod = PAMS_NAMES[arch]
    torch.manual_seed(3)
    src = get_arch(arch)(scale=scale).eval()
    with torch.no_grad():  # distinct clip values so a wrong mapping shows
        for sel in src.selectors:
            sel.quant_bit3.alpha.uniform_(5.0, 50.0)
            sel.quant_bit3.max_val.copy_(sel.quant_bit3.alpha[0] + 1)
            sel.net_small[0].weight.normal_()  # the PAMS file has no selector heads
    pams = _to_pams(src, names)
    assert len(pams) == PAMS_ENTRIES[arch][scale]
    assert mod.is_pams_state_dict(pams)  # type: ignore[attr-defined]
    assert not mod.is_pams_state_dict(src.state_dict())  # type: ignore[attr-defined]

    converted = mod.pams_to_cadyq(pams)  # type: ignore[attr-defined]
    dst = get_arch(arch)(scale=scale).eval()
    dst.load_state_dict(converted, strict=True)
    for s_src, s_dst in zip(src.selectors, dst.selectors):
        for q in s_dst.candidates:
            assert torch.equal(q.alpha, s_src.quant_bit3.alpha)
            assert torch.equal(q.max_val, s_src.quant_bit3.max_val)
        assert torch.equal(s_dst.net_small[0].weight, torch.ones(3, s_dst.channels + 2))
        assert torch.equal(s_dst.net_small[0].bias, torch.tensor([0.0, 0.0, 1.0]))

    # the student starts as its PAMS source: dynamic (all 8 bits) == source in w8a8
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 255
    set_quant_mode(src, "w8a8")
    set_quant_mode(dst, "dynamic")
    with torch.no_grad():
        (a, _), (b, bits) = src(x), dst(x)
    assert (bits == 8).all()
    assert torch.equal(a, b)

    # a module. prefix is tolerated; a non-PAMS dict is refused
    prefixed = {f"module.{k}": v for k, v in pams.items()}
    assert mod.pams_to_cadyq(prefixed).keys() == converted.keys()  # type: ignore[attr-defined]
    with pytest.raises(CheckpointMismatchError):
        mod.pams_to_cadyq(src.state_dict())  # type: ignore[attr-defined]


@pytest.mark.parametrize("arch", list(CADYQ_COUNTS))
def test_region_grid_and_training_step(arch: str) -> None:
    """Per-region bits come back as (N, n_sel, nh, nw); a training step backpropagates to every selector."""
    from cadyq_cli.quant import RegionGrid

    m = get_arch(arch)(scale=2)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 255
    m.eval()
    with torch.no_grad():
        sr, bits = m(x, RegionGrid.uniform(8, 8, 4))
    assert sr.shape == (2, 3, 16, 16)
    assert bits.shape == (2, N_SELECTORS[arch], 2, 2)
    m.train()
    sr, bits = m(x)
    (sr.mean() + m.soft_bits().mean()).backward()
    assert all(s.net_small[0].weight.grad is not None for s in m.selectors)
    assert all(s.quant_bit3.alpha.grad is not None for s in m.selectors)


@pytest.mark.parametrize("r", [2, 3])
def test_fast_pixel_shuffle_matches_torch(r: int) -> None:
    from cadyq_cli.models._base import PixelShuffle

    x = torch.randn(2, 4 * r * r, 5, 7)
    with torch.inference_mode():
        assert torch.equal(PixelShuffle(r)(x), torch.nn.functional.pixel_shuffle(x, r))
        cl = PixelShuffle(r)(x.contiguous(memory_format=torch.channels_last))
        assert cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(cl, torch.nn.functional.pixel_shuffle(x, r))
    xg = x.clone().requires_grad_(True)  # training path: the stock operator, gradients flow
    PixelShuffle(r)(xg).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))


@pytest.mark.parametrize("arch,scale", [("edsr", 2), ("edsr", 3), ("edsr", 4), ("carn", 3), ("srresnet", 2), ("srresnet", 4)])
def test_tail_in_row_strips_equals_whole_tail(arch: str, scale: int) -> None:
    """With a tiny memory budget the upsampling tail runs in 8-row strips (plus halo): same image."""
    torch.manual_seed(0)
    model = create_model(arch, scale)
    for p in model.parameters():  # weights scaled down so activations stay moderate
        p.data.mul_(0.5)
    set_quant_mode(model, "fp32")
    model.eval()
    x = torch.rand(2, 3, 29, 17) * 255
    with torch.inference_mode():
        whole, _ = model(x)
        model.tail_budget_bytes = 1  # -> strips of 8 LR rows
        strips, _ = model(x)
    assert strips.shape == whole.shape == (2, 3, 29 * scale, 17 * scale)
    assert torch.allclose(strips, whole, rtol=0, atol=1e-3 * float(whole.abs().max()))


def test_every_shipped_model_matches_its_manifest_entry() -> None:
    """The files in weights/ load (checksum verified by load_model) at the scale and parameter
    count their manifest entries state, with metrics for every set and mode the README shows."""
    from cadyq_cli.weights import list_weights, load_model

    entries = list_weights()
    assert {e.scale for e in entries if e.arch == "edsr_baseline"} >= {2, 3, 4}
    for e in entries:
        net = load_model(e.name, scale=e.scale, mode="dynamic", kernels="float")
        assert net.scale == e.scale
        assert sum(p.numel() for p in net.parameters()) == e.params, e.name
        for dataset in ("Set5", "Set14", "B100", "Urban100"):
            assert {"fp32", "w8a8", "w8a4", "dynamic"} <= set(e.metrics[dataset]), (e.name, dataset)
