"""Tiling: the seamless plan equals whole-image inference, the paper plan follows the official
geometry, and neither the canvas type nor the tile batch changes a result."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import Result

from cadyq_cli.engine import TilingConfig, upscale_array
from cadyq_cli.io import read_image
from cadyq_cli.tiling import plan_seamless
from conftest import _ok, _open


def test_seamless_tiles_equal_whole_image_fp32(cli: Callable[..., Result], make_image: Callable[..., Path],
                                               load_x2: Callable[[str], object], tmp_path: Path) -> None:
    w, h = 100, 6  # wider than tile + 2 * receptive radius: really several tiles
    net = load_x2("fp32")
    assert len(plan_seamless(h, w, 2, 16, net.receptive_radius, 8)) > 1  # type: ignore[attr-defined]
    src = make_image("strip.png", w, h)
    rgb = read_image(src).rgb
    whole, _ = upscale_array(net, rgb, TilingConfig("whole"))  # type: ignore[arg-type]
    tiled, rep = upscale_array(net, rgb, TilingConfig("seamless", tile=16, region=8))  # type: ignore[arg-type]
    assert np.abs(tiled - whole).max() <= 1e-3
    assert rep.grid == (1, 13)

    res = cli("upscale", src, tmp_path / "out.png", "--mode", "fp32", "--tiling", "seamless", "--tile", "16",
              "--region", "8", "--json", "-")
    _ok(res)
    rec = json.loads(res.stdout)
    assert rec["mode"] == "fp32" and rec["fab"] == 32.0 and rec["bitops_g"] == rec["bitops_fp32_g"]
    out = np.asarray(_open(tmp_path / "out.png")).astype(np.int64)
    assert np.abs(out - np.rint(whole)).max() <= 1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 70), w=st.integers(1, 70), tile=st.integers(6, 40), region=st.integers(2, 16),
       seed=st.integers(0, 3))
def test_seamless_property(pattern: Callable[..., np.ndarray], small_model: Callable[[str], object], h: int, w: int, tile: int, region: int,
                           seed: int) -> None:
    rgb = pattern(w, h, seed=seed).astype(np.float32)
    net = small_model("fp32")
    whole, _ = upscale_array(net, rgb, TilingConfig("whole"))  # type: ignore[arg-type]
    tiled, _ = upscale_array(net, rgb, TilingConfig("seamless", tile=tile, region=region))  # type: ignore[arg-type]
    assert tiled.shape == whole.shape == (2 * h, 2 * w, 3)
    assert np.abs(tiled - whole).max() <= 1e-3
    sr, rep = upscale_array(small_model("dynamic"), rgb,  # type: ignore[arg-type]
                            TilingConfig("seamless", tile=tile, region=region, any_tile=True))
    assert sr.shape == (2 * h, 2 * w, 3)
    assert rep.grid == (-(-h // region), -(-w // region))
    cover = np.zeros((h, w), int)
    for r in rep.regions:
        x0, y0, x1, y1 = r.box
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()


@pytest.mark.parametrize("tiling", [TilingConfig("seamless", tile=16, region=8, any_tile=True),
                                    TilingConfig("paper", tile=24, overlap=4)])
def test_uint8_canvas_is_the_rounded_float_canvas(pattern: Callable[..., np.ndarray], small_model: Callable[[str], object],
                                                  tiling: TilingConfig) -> None:
    rgb = pattern(45, 37, seed=2).astype(np.float32)
    net = small_model("dynamic")
    f32, rep_f = upscale_array(net, rgb, tiling)  # type: ignore[arg-type]
    u8, rep_u = upscale_array(net, rgb, tiling, out_dtype="uint8")  # type: ignore[arg-type]
    assert u8.dtype == np.uint8 and f32.dtype == np.float32 and u8.shape == f32.shape == (74, 90, 3)
    assert u8.flags.c_contiguous and f32.flags.c_contiguous
    assert np.array_equal(u8, np.rint(f32).astype(np.uint8))  # the same rounding write_image applies
    assert rep_u.fab == rep_f.fab and rep_u.regions == rep_f.regions
    with pytest.raises(ValueError, match="out_dtype"):
        upscale_array(net, rgb, tiling, out_dtype="float16")  # type: ignore[arg-type]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 70), w=st.integers(1, 70), tile=st.integers(8, 40), overlap=st.integers(0, 8),
       mode=st.sampled_from(["fp32", "dynamic"]))
def test_paper_tiling_property(pattern: Callable[..., np.ndarray], small_model: Callable[[str], object], h: int, w: int, tile: int, overlap: int,
                               mode: str) -> None:
    overlap = min(overlap, tile // 2)  # step >= 4: at most ~300 patches
    rgb = pattern(w, h).astype(np.float32)
    sr, rep = upscale_array(small_model(mode), rgb, TilingConfig("paper", tile=tile, overlap=overlap))  # type: ignore[arg-type]
    assert sr.shape == (2 * h, 2 * w, 3) and np.isfinite(sr).all()
    assert rep.width == w and rep.height == h


def test_paper_tiling_cli_small_image(cli: Callable[..., Result], make_image: Callable[..., Path],
                                      tmp_path: Path) -> None:
    src = make_image("in.png", 13, 7)  # smaller than one 96 px patch
    _ok(cli("upscale", src, tmp_path / "out.png", "--tiling", "paper", "-q"))
    assert _open(tmp_path / "out.png").size == (26, 14)



def test_tile_batch_size_does_not_change_output(load_x2: Callable[[str], object], pattern: Callable[..., np.ndarray]) -> None:
    from cadyq_cli.engine import TilingConfig, upscale_array

    model = load_x2("dynamic")
    rgb = pattern(70, 50).astype(np.float32)
    outs = [upscale_array(model, rgb, TilingConfig("paper", tile=24, overlap=4, batch=b)) for b in (1, 3, 16)]
    for sr, rep in outs[1:]:
        assert np.array_equal(sr, outs[0][0])
        assert [r.bits for r in rep.regions] == [r.bits for r in outs[0][1].regions]
    outs = [upscale_array(model, rgb, TilingConfig("seamless", tile=16, region=16, batch=b, any_tile=True))
            for b in (1, 4)]
    assert np.array_equal(outs[0][0], outs[1][0])
