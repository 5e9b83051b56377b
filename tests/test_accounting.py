"""The torch-free cost accounting (cadyq_cli.accounting) against the probe-measured table of quant.cost."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cadyq_cli.accounting import bitops, carn_cost_table, edsr_cost_table, fab
from cadyq_cli.models import create_model
from cadyq_cli.quant.cost import cost_table


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_cost_table_equals_the_measured_one(scale: int) -> None:
    assert edsr_cost_table(scale) == cost_table(create_model("edsr", scale))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_carn_cost_table_equals_the_measured_one(scale: int) -> None:
    assert carn_cost_table(scale) == cost_table(create_model("carn", scale))


def test_bitops_and_fab_accept_tensors_and_arrays() -> None:
    table = edsr_cost_table(2)
    px = np.array([96 * 96, 96 * 40], dtype=np.float64)
    bits = np.full((2, 32), 8.0)
    bits[1, ::2] = 4.0
    a = bitops(table, px, bits)
    assert a == bitops(table, torch.from_numpy(px), torch.from_numpy(bits))
    assert a < bitops(table, px, None, 8) < bitops(table, px, None, 32)
    assert fab(bits) == pytest.approx((8.0 + 6.0) / 2)
    assert fab(np.zeros((0, 0))) == 32.0
