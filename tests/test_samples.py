"""Float samples to integers (cadyq_cli/samples.py): the one clamp-and-round both writers use."""
from __future__ import annotations

import numpy as np
import pytest

from cadyq_cli.samples import round_into


def test_round_into_clamps_rounds_half_to_even_and_takes_nan_to_zero() -> None:
    src = np.array([[-3.0, 0.5, 1.5, 2.5, 254.5, 300.0, np.nan, np.inf, -np.inf]], np.float32)
    out = round_into(src, np.zeros(src.shape, np.uint8), 255)
    assert out.tolist() == [[0, 0, 2, 2, 254, 255, 0, 255, 0]]
    scaled = round_into(np.array([[0.5, 1.0, 2.0]]), np.zeros((1, 3), np.uint16), 65535, scale=65535.0)
    assert scaled.tolist() == [[32768, 65535, 65535]]  # float64 input, 0.5 * 65535 = 32767.5 -> even


def test_round_into_matches_whole_array_arithmetic_over_many_blocks_and_strided_views() -> None:
    rng = np.random.default_rng(1)
    part = (rng.random((3, 700, 130), np.float32) * 300 - 20)  # channel-first, as the engine's tiles
    dst = np.zeros((700, 130, 3), np.uint8)
    for c in range(3):
        round_into(part[c], dst[:, :, c], 255)  # strided destination, several row blocks
    expect = np.rint(np.clip(np.transpose(part, (1, 2, 0)), 0, 255)).astype(np.uint8)
    assert np.array_equal(dst, expect)
    assert round_into(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.uint8), 255).shape == (0, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        round_into(part[0], dst, 255)
