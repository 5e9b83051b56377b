"""Self-checks of the independent official-CADyQ reference (tests/official_reference.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

try:
    from tests import official_reference as ref
except ImportError:  # tests/ itself on sys.path (pytest prepend mode)
    import official_reference as ref  # type: ignore[no-redef]

# Spec section 3, counts table: (entries, unique parameters) for x2 / x3 / x4.
SPEC_COUNTS: dict[tuple[str, str], dict[int, tuple[int, int]]] = {
    ("edsr", "cadyq"): {2: (364, 1376427), 3: (364, 1561067), 4: (366, 1524139)},
    ("edsr", "pams"): {2: (204, 1369931), 3: (204, 1554571), 4: (206, 1517643)},
    ("carn", "cadyq"): {s: (220, 1595635) for s in (2, 3, 4)},
    ("carn", "pams"): {s: (148, 1591981) for s in (2, 3, 4)},
    ("idn", "cadyq"): {s: (262, 594853) for s in (2, 3, 4)},
    ("idn", "pams"): {s: (166, 590941) for s in (2, 3, 4)},
    ("srresnet", "cadyq"): {2: (511, 1407898), 3: (509, 1260441), 4: (513, 1555355)},
    ("srresnet", "pams"): {2: (319, 1401402), 3: (317, 1253945), 4: (321, 1548859)},
}

# Number of alias groups (one per shared tensor) per spec section 2.2, independent of scale.
SPEC_ALIAS_GROUPS = {
    ("edsr", "cadyq"): 0,
    ("edsr", "pams"): 16 * 2,  # body.{i}.body.2.{alpha,max_val}
    ("carn", "cadyq"): 0,
    ("carn", "pams"): 9 * 2 * 2,  # body.0 / body.3, two leaves
    ("idn", "cadyq"): 2 * 2,  # fblock.module.0 / .3
    ("idn", "pams"): 2 * 2 + 4 * 6 * 2,
    ("srresnet", "cadyq"): 1,  # head.1.weight shared by 16 body.{i}.act.weight
    ("srresnet", "pams"): 1,
}

RUN_CASES = [
    ("edsr", 2), ("edsr", 3), ("edsr", 4),
    ("carn", 2), ("carn", 4),
    ("srresnet", 2), ("srresnet", 4),
    ("idn", 2), ("idn", 4),
]


def _flat(n: int = 20) -> torch.Tensor:
    return torch.tensor([130.0, 100.0, 90.0]).view(1, 3, 1, 1).expand(1, 3, n, n).clone()


def _noisy(n: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, n, n), generator=g).float()


def _smooth(n: int = 20) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    base = 128 + 80 * torch.sin(xx / 3.0) * torch.cos(yy / 4.0)
    return torch.stack([base, base * 0.8 + 20, base * 0.6 + 40]).unsqueeze(0).round()


@pytest.fixture(scope="module")
def calibrated() -> dict[tuple[str, int, str], dict[str, torch.Tensor]]:
    """Calibrated random CADyQ state dicts for RUN_CASES (built lazily)."""
    return {}


def _get_sd(cache: dict, arch: str, scale: int, kind: str = "cadyq") -> dict[str, torch.Tensor]:
    key = (arch, scale, kind)
    if key not in cache:
        sd = ref.random_official_state_dict(arch, scale, kind, seed=0)
        cache[key] = ref.calibrate_alphas(sd, arch, scale, torch.cat([_smooth(), _noisy()]))
    return cache[key]


# --------------------------------------------------------------------------- key tables


@pytest.mark.parametrize("arch,kind", sorted(SPEC_COUNTS))
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_key_counts_match_spec(arch: str, kind: str, scale: int) -> None:
    entries, params = SPEC_COUNTS[(arch, kind)][scale]
    assert len(ref.official_keys(arch, scale, kind)) == entries
    assert ref.unique_param_count(arch, scale, kind) == params


@pytest.mark.parametrize("arch,kind", sorted(SPEC_ALIAS_GROUPS))
def test_alias_groups(arch: str, kind: str) -> None:
    groups = ref.alias_groups(arch, 4, kind)
    assert len(groups) == SPEC_ALIAS_GROUPS[(arch, kind)]
    keys = ref.official_keys(arch, 4, kind)
    for g in groups:
        assert all(k in keys for k in g)
        assert len({keys[k] for k in g}) == 1
    if arch == "srresnet":
        assert groups[0][0] == "head.1.weight" and len(groups[0]) == 17


def test_key_table_spot_checks() -> None:
    k = ref.official_keys("idn", 4, "cadyq")
    assert k["dblocks.2.enhancement_top.3.net_small.0.weight"] == (3, 50)
    assert k["dblocks.2.enhancement_top.6.net_small.0.weight"] == (3, 34)
    assert k["dblocks.0.enhancement_bottom.4.weight"] == (48, 16, 3, 3)
    assert k["deconv.weight"] == (64, 3, 17, 17)
    e3 = ref.official_keys("edsr", 3, "cadyq")
    assert e3["tail.0.0.weight"] == (576, 64, 3, 3) and "tail.0.2.weight" not in e3
    s4 = ref.official_keys("srresnet", 4, "pams")
    assert "head.0.bias" not in s4 and "body.16.bias" not in s4
    assert s4["body.3.bn1.num_batches_tracked"] == ()
    assert "tail.0.0.weight" not in ref.official_keys("srresnet", 3, "cadyq")
    c = ref.official_keys("carn", 2, "cadyq")
    assert {"upsample.up2.body.0.weight", "upsample.up3.body.0.weight",
            "upsample.up4.body.3.weight"} <= set(c)


# --------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("arch", ref.ARCHS)
@pytest.mark.parametrize("kind", ref.KINDS)
def test_random_state_dict_format(arch: str, kind: str) -> None:
    scale = 4
    sd = ref.random_official_state_dict(arch, scale, kind, seed=3)
    table = ref.official_keys(arch, scale, kind)
    assert list(sd) == list(table)
    for k, shape in table.items():
        assert tuple(sd[k].shape) == shape, k
        want = torch.int64 if k.endswith("num_batches_tracked") else torch.float32
        assert sd[k].dtype == want, k
        if k.endswith(".alpha"):
            assert shape == (1,) and float(sd[k]) > 0
        if k.endswith(".max_val"):
            assert shape == ()
        if k.endswith("running_var"):
            assert bool((sd[k] > 0).all())
    for g in ref.alias_groups(arch, scale, kind):
        for k in g[1:]:
            assert sd[k] is sd[g[0]]
    ms = [k for k in sd if "_mean" in k and k.endswith("weight")]
    for k in ms:
        assert torch.equal(sd[k], torch.eye(3).view(3, 3, 1, 1))
    if arch != "idn":
        bias = sd["sub_mean.shifter.bias" if arch == "carn" else "sub_mean.bias"]
        mult = 1.0 if arch == "carn" else 255.0
        assert torch.allclose(bias, -mult * torch.tensor(ref.RGB_MEAN))
    # deterministic per seed
    sd2 = ref.random_official_state_dict(arch, scale, kind, seed=3)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_calibration_keeps_aliases_and_sets_alphas() -> None:
    sd = ref.random_official_state_dict("idn", 2, "pams", seed=1)
    x = _smooth(12)
    cal = ref.calibrate_alphas(sd, "idn", 2, x)
    assert float(cal["fblock.quant_actf1.alpha"]) == float(x.abs().max())
    for g in ref.alias_groups("idn", 2, "pams"):
        assert all(torch.equal(cal[k], cal[g[0]]) for k in g)
    sd = ref.random_official_state_dict("edsr", 2, "cadyq", seed=1)
    cal = ref.calibrate_alphas(sd, "edsr", 2, x)
    a = [float(cal[f"body.5.body.2.quant_bit{j}.alpha"]) for j in (1, 2, 3)]
    assert a[0] < a[1] < a[2]
    assert cal["body.5.body.2.quant_bit3.alpha"].shape == (1,)
    assert cal["body.5.body.2.quant_bit3.max_val"].shape == ()


# --------------------------------------------------------------------------- primitives


def test_pams_quant_grid() -> None:
    alpha = torch.tensor([2.0])
    x = torch.linspace(-3, 3, 1001)
    for bits, qmax in ((4, 7), (6, 31), (8, 127)):
        q = ref.pams_quant(x, alpha, bits)
        levels = torch.unique(torch.round(q / 2.0 * qmax))
        assert levels.min() == -qmax and levels.max() == qmax
        assert len(torch.unique(q)) == 2 * qmax + 1
    # non-negative input keeps the signed grid (only qmax + 1 levels used)
    q = ref.pams_quant(torch.linspace(0, 3, 1001), alpha, 4)
    assert len(torch.unique(q)) == 8
    # round half to even: 0.5 * alpha / qmax -> 0
    assert float(ref.pams_quant(torch.tensor([1.0 / 7.0]), alpha, 4)) == 0.0


def test_weight_quant() -> None:
    w = torch.randn(8, 4, 3, 3)
    q = ref.quantize_weight(w)
    m = w.abs().max() + 1e-8
    assert len(torch.unique(q)) <= 255
    assert torch.allclose(q, torch.round(w * 127 / m) * m / 127)
    assert (q - w).abs().max() <= m / 127 / 2 + 1e-6


def test_gradient_feature_ramp() -> None:
    a = 0.01
    ramp = (torch.arange(10, dtype=torch.float32) * a).view(1, 1, 1, 10).expand(1, 3, 7, 10)
    g = ref.gradient_feature(ramp.contiguous())
    # interior columns: a; the two border columns: a / 2 (replicate padding)
    assert torch.allclose(g[0, 0], torch.tensor((8 * a + 2 * a / 2) / 10), atol=1e-7)
    assert abs(float(g[0, 1])) < 1e-8  # exact cancellation is up to the conv summation order


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("arch,scale", RUN_CASES)
def test_forward_runs(calibrated: dict, arch: str, scale: int) -> None:
    sd = _get_sd(calibrated, arch, scale)
    x = _smooth()
    sr, bits = ref.official_forward(sd, arch, scale, x)
    assert sr.shape == (1, 3, 20 * scale, 20 * scale) and sr.dtype == torch.float32
    assert bool(torch.isfinite(sr).all())
    assert -500 < float(sr.min()) and float(sr.max()) < 800
    assert 20 < float(sr.mean()) < 235
    assert bits.shape == (1, ref.N_SELECTORS[arch])
    assert set(bits.unique().tolist()) <= {4.0, 6.0, 8.0}


def test_bits_vary_with_content(calibrated: dict) -> None:
    sd = _get_sd(calibrated, "edsr", 2)
    _, b_flat = ref.official_forward(sd, "edsr", 2, _flat())
    _, b_noisy = ref.official_forward(sd, "edsr", 2, _noisy(seed=5))
    assert not torch.equal(b_flat, b_noisy)
    assert len(torch.cat([b_flat, b_noisy]).unique()) == 3  # all of 4, 6 and 8 are used


def test_batch_is_per_sample(calibrated: dict) -> None:
    sd = _get_sd(calibrated, "carn", 2)
    x = torch.cat([_flat(12), _noisy(12)])
    sr, bits = ref.official_forward(sd, "carn", 2, x)
    sr1, bits1 = ref.official_forward(sd, "carn", 2, x[1:])
    assert torch.equal(sr[1:], sr1) and torch.equal(bits[1:], bits1)


def test_ste_equals_hard_path(calibrated: dict) -> None:
    """The STE expression differs from the selected quantizer only by float rounding."""
    sd = _get_sd(calibrated, "edsr", 2)
    x = torch.randn(1, 64, 9, 9) * 3
    run = ref._Runner(sd, True, torch.tensor([[30.0, 10.0]]))
    out = run.selector(x, "body.3.body.2")
    bits = int(run.bits[0])
    j = {4: 1, 6: 2, 8: 3}[bits]
    hard = ref.pams_quant(x, sd[f"body.3.body.2.quant_bit{j}.alpha"], bits)
    assert (out - hard).abs().max() < 1e-6


@pytest.mark.parametrize("arch", ref.ARCHS)
def test_pams_student_reproduces_teacher(arch: str) -> None:
    """Section 2.3: a freshly initialized student runs at 8 bits and matches its PAMS source."""
    sd = ref.random_official_state_dict(arch, 2, "pams", seed=2)
    sd = ref.calibrate_alphas(sd, arch, 2, _smooth(12))
    student = ref.pams_to_cadyq_student(sd, arch, 2)
    assert list(student) == list(ref.official_keys(arch, 2, "cadyq"))
    x = _noisy(12, seed=1)
    y_t, b_t = ref.official_forward(sd, arch, 2, x)
    y_s, b_s = ref.official_forward(student, arch, 2, x)
    assert b_t.shape == (1, 0)
    assert bool((b_s == 8).all())
    assert (y_t - y_s).abs().max() <= 1e-3


def test_srresnet_x3_rejected() -> None:
    sd = ref.random_official_state_dict("srresnet", 3, "cadyq")
    with pytest.raises(ValueError):
        ref.official_forward(sd, "srresnet", 3, _flat(8))


# --------------------------------------------------------------------------- patch protocol


def test_patch_windows_tile_exactly_once() -> None:
    rnd = random.Random(0)
    for _ in range(300):
        scale = rnd.choice([2, 3, 4])
        step = rnd.randint(1, 20)
        patch = step + rnd.randint(0, 20)
        n = rnd.randint(1, 80)
        starts = ref._starts(n, patch, step)
        assert starts[0] == 0 and starts[-1] <= max(n - patch, 0)
        assert max(n - patch, 0) - starts[-1] < step
        margin = int(((patch - step) / 2) * scale)
        cover = np.zeros(n * scale, dtype=int)
        for i, x0 in enumerate(starts):
            x1 = n if i == len(starts) - 1 else x0 + patch
            assert x1 - x0 <= patch + step - 1 or len(starts) == 1
            plen = (x1 - x0) * scale
            ps, os_ = ref._window(i, len(starts), x0 * scale, margin, step * scale, n * scale,
                                  plen)
            assert len(range(plen)[ps]) == len(range(n * scale)[os_])
            cover[os_] += 1
        assert (cover == 1).all()


def test_patch_test_protocol(calibrated: dict) -> None:
    sd = _get_sd(calibrated, "edsr", 2)
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, size=(22, 27, 3), dtype=np.uint8)
    # rows: starts 0, 8 (last extends to 22); cols: 0, 8 (last extends to 27)
    hr, bits = ref.official_patch_test(sd, "edsr", 2, lr, patch=12, step=8)
    assert hr.shape == (44, 54, 3) and hr.dtype == np.uint8
    assert len(bits) == 4 and all(b.shape == (1, 32) for b in bits)
    # the bottom-right patch output survives in the bottom-right corner (margin 4 HR px)
    sr, b = ref.official_forward(sd, "edsr", 2, torch.from_numpy(lr[8:, 8:]).permute(2, 0, 1)
                                 .float().unsqueeze(0))
    corner = torch.round(torch.clamp(sr, 0, 255))[0].permute(1, 2, 0).numpy().astype(np.uint8)
    assert np.array_equal(hr[16 + 4:, 16 + 4:], corner[4:, 4:])
    assert torch.equal(bits[3], b)
    # a single patch (image smaller than the patch) equals the whole-image test
    small = lr[:10, :11]
    hr_p, bits_p = ref.official_patch_test(sd, "edsr", 2, small, patch=12, step=8)
    hr_w, bits_w = ref.official_whole_test(sd, "edsr", 2, small)
    assert np.array_equal(hr_p, hr_w) and len(bits_p) == 1 and torch.equal(bits_p[0], bits_w)
