"""``--fp-layers bf16``: the upsampling tail in bf16, everything else (bits, quantized layers) unchanged."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from cadyq_cli.engine import TilingConfig, upscale_array
from cadyq_cli.models._base import SRModel


@pytest.mark.parametrize("arch", ["edsr", "idn"])
def test_bf16_tail_same_bits_close_output(arch: str, pattern: Callable[..., np.ndarray]) -> None:
    from cadyq_cli.models import create_model
    from cadyq_cli.quant.modules import set_quant_mode

    from conftest import _randomize

    model: SRModel = _randomize(create_model(arch, 2))  # type: ignore[arg-type]
    set_quant_mode(model, "dynamic")
    rgb = pattern(40, 36)
    cfg = TilingConfig("seamless", region=16)
    ref, rep_ref = upscale_array(model, rgb, cfg)
    model.set_fp_layers("bf16")
    try:
        out, rep = upscale_array(model, rgb, cfg)
    finally:
        model.set_fp_layers("fp32")
    assert rep.fp_layers == "bf16" and rep_ref.fp_layers == "fp32"
    assert [r.bits for r in rep.regions] == [r.bits for r in rep_ref.regions]  # the body is untouched
    d = np.abs(out - ref)
    assert 0 < d.max() < 4.0  # bf16 really ran (outputs differ), and only by bf16 rounding
    assert d.mean() < 0.5
    again, _ = upscale_array(model, rgb, cfg)  # back to fp32: the reference, bit for bit
    assert np.array_equal(again, ref)


def test_unknown_precision_refused() -> None:
    from cadyq_cli.models import create_model

    with pytest.raises(ValueError, match="bf16"):
        create_model("edsr", 2).set_fp_layers("fp16")
