"""Stage-start calibration (train/calibrate.py): MSE clips, standardized selectors that fold to raw features."""
from __future__ import annotations

import torch


def test_standardized_selector_folds_to_raw_features() -> None:
    from cadyq_cli.quant.modules import BitSelector, QuantContext

    torch.manual_seed(0)
    sel = BitSelector(4)
    with torch.no_grad():
        sel.net_small[0].weight.normal_()
        sel.net_small[0].bias.normal_()
    x = torch.randn(5, 4, 8, 8) * torch.rand(5, 1, 1, 1) * 30
    ctx = QuantContext(grad=torch.rand(5, 2, 1, 1) * 100, grid=None)
    sel.znorm = (torch.rand(6) * 10, torch.rand(6) + 0.5)
    normalized = sel.logits(x, ctx)
    w, b = sel.folded_linear()
    raw = sel.features(x, ctx).flatten(0, 2) @ w.T + b
    assert torch.allclose(normalized.reshape(5, 3), raw, rtol=1e-5, atol=1e-4)


def test_mse_clip_beats_max_and_official_copy() -> None:
    from cadyq_cli.quant.primitives import fake_quant_act
    from cadyq_cli.train.calibrate import mse_clip

    x = torch.randn(50_000).abs() ** 2 * 10  # heavy-tailed, non-negative like post-ReLU features
    top = float(x.abs().max())
    a4, a8 = mse_clip(x, 4), mse_clip(x, 8)
    err = lambda a, q: float((fake_quant_act(x, torch.tensor([a]), q) - x).pow(2).mean())  # noqa: E731
    assert a4 < a8 <= top  # fewer bits: a tighter clip
    assert err(a4, 7.0) < 0.5 * err(top, 7.0)
    assert err(a4, 7.0) <= min(err(f * top, 7.0) for f in (0.1, 0.2, 0.4, 0.8))
