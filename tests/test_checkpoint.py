"""Checkpoints from the command line: untrusted pickles refused, truncated files and scale mismatches
named in one line."""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from cadyq_cli.cli import app
from conftest import _error_line



class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch on the hostile file: expected
@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_malicious_checkpoint_refused(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path,
                                      how: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    if how == "torch":
        torch.save({"state_dict": _Evil(marker)}, evil)
    else:
        evil.write_bytes(pickle.dumps(_Evil(marker)))
    assert not marker.exists()
    src = make_image("in.png", 12, 10)
    res = CliRunner().invoke(app, ["upscale", str(src), str(tmp_path / "out.png"), "--weights", str(evil),
                                   "--scale", "2", "--threads", "1"])
    assert res.exit_code == 2
    line = _error_line(res, "evil.pt", "refused")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "run code" in line
    assert not marker.exists()
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_truncated_checkpoint(make_image: Callable[..., Path], weights_x2: Path, tmp_path: Path, kind: str) -> None:
    if kind == "pt":
        full = tmp_path / "full.pt"
        from safetensors.torch import load_file

        torch.save(load_file(str(weights_x2)), full)
    else:
        full = weights_x2
    data = full.read_bytes()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: len(data) // 2])
    src = make_image("in.png", 12, 10)
    res = CliRunner().invoke(app, ["upscale", str(src), str(tmp_path / "out.png"), "--weights", str(cut),
                                   "--scale", "2", "--threads", "1"])
    assert res.exit_code == 2
    line = _error_line(res, str(cut))
    assert "truncated" in line or "corrupt" in line


def test_checkpoint_scale_mismatch(make_image: Callable[..., Path], weights_x2: Path, tmp_path: Path) -> None:
    src = make_image("in.png", 12, 10)
    res = CliRunner().invoke(app, ["upscale", str(src), str(tmp_path / "out.png"), "--weights", str(weights_x2),
                                   "--scale", "4", "--threads", "1"])
    assert res.exit_code == 2
    line = _error_line(res, "x2")
    assert "x4" in line
