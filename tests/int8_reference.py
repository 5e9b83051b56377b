"""Shared by the int8 exactness tests: the shipped x4 on a crop of examples/scene.png in three arithmetics."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from cadyq_cli.quant.intconv import set_kernels
from cadyq_cli.quant.regions import RegionGrid

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def scene_crop() -> tuple[torch.Tensor, RegionGrid]:
    """The top-left 64 x 96 of examples/scene.png as a (1, 3, H, W) float tensor, with 32 px regions."""
    from cadyq_cli.io import read_image

    rgb = read_image(EXAMPLES / "scene.png").rgb[:64, :96]
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float(), RegionGrid.uniform(64, 96, 32)


def three_ways(model: torch.nn.Module, x: torch.Tensor, grid: RegionGrid) -> dict[str, torch.Tensor]:
    """``model`` (float kernels) run in float64 (its decisions kept float32, as in every path), in float32 and with
    int8 kernels: the bits of each (``bits64``, ``bits_f``, ``bits_i``) and each output's distance in grey levels
    from the float64 one after rounding (``err_f``, ``err_i``). Leaves the model on int8 kernels."""
    m64 = copy.deepcopy(model).double()
    for s in m64.selectors:
        s.net_small.float()
        s._bits_table, s._qmax_table = s._bits_table.float(), s._qmax_table.float()
    with torch.inference_mode():
        exact, bits64 = m64(x.double(), grid)
        f32, bits_f = model(x, grid)
        assert set_kernels(model, "int8") == "int8"
        i8, bits_i = model(x, grid)
    exact = exact.clamp(0, 255).round()
    return {"bits64": bits64, "bits_f": bits_f, "bits_i": bits_i,
            "err_f": (f32.double().clamp(0, 255).round() - exact).abs(),
            "err_i": (i8.double().clamp(0, 255).round() - exact).abs()}
