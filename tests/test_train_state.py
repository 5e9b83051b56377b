"""Training checkpoints (train/state.py) and the one reader behind them (checkpoint.read_checkpoint)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cadyq_cli.checkpoint import TRAIN_FORMAT, read_checkpoint, read_state_dict, save_weights
from cadyq_cli.cli import app
from cadyq_cli.errors import CheckpointReadError
from cadyq_cli.models import create_model
from cadyq_cli.train.config import TrainConfig
from cadyq_cli.train.state import load_state, restore_state, save_state


def _model(act_grid: str = "relu-unsigned", skip: str = "fp"):
    torch.manual_seed(3)
    m = create_model("edsr_baseline", 2)
    m.set_act_grid(act_grid)
    m.set_skip(skip)
    return m


def test_save_then_restore_is_exact(tmp_path: Path) -> None:
    """Model (with standardized selectors folded on save, unfolded on restore), optimizer, step and
    every RNG come back as saved."""
    cfg = TrainConfig(stage="cadyq", scale=2, act_grid="relu-unsigned", skip="fp")
    model = _model()
    sel = model.selectors[0]
    sel.znorm = (torch.rand(sel.net_small[0].weight.shape[1]) + 1, torch.rand(sel.net_small[0].weight.shape[1]) + 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 8, 8) * 255)[0].mean().backward()
    opt.step()
    np_rng = np.random.default_rng(5)
    np_rng.random(3)
    torch.manual_seed(11)
    random.seed(12)
    save_state(tmp_path / "last.pt", model, opt, 7, cfg, np_rng, 42.0)
    want = (torch.rand(4), np_rng.random(4), random.random())

    st = load_state(tmp_path / "last.pt")
    assert st["format"] == TRAIN_FORMAT and st["config"]["act_grid"] == "relu-unsigned"
    torch.manual_seed(0)
    other = create_model("edsr_baseline", 2)
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-3)
    rng2 = np.random.default_rng(0)
    assert restore_state(st, other, other_opt, rng2, torch.device("cpu")) == (7, 42.0)
    assert (torch.rand(4).tolist(), rng2.random(4).tolist(), random.random()) == (want[0].tolist(), want[1].tolist(), want[2])
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    assert torch.equal(other.selectors[0].znorm[1], sel.znorm[1])
    saved_opt, back = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert back.keys() == saved_opt.keys() and len(back) > 0
    assert all(torch.equal(saved_opt[k]["exp_avg_sq"], back[k]["exp_avg_sq"]) for k in back)


def test_one_reader_for_weights_and_training_checkpoints(tmp_path: Path) -> None:
    """A safetensors file reads as a training state (weights and the config its metadata records), and a
    training checkpoint reads as weights (metadata from its config): the same keys both ways."""
    model = _model()
    save_weights(model, tmp_path / "m.safetensors", {"stage": "pams"})
    st = read_checkpoint(tmp_path / "m.safetensors")
    assert st["config"] == {"stage": "pams", "arch": "edsr_baseline", "scale": 2, "act_grid": "relu-unsigned", "skip": "fp"}
    assert st["model"].keys() == model.state_dict().keys()

    cfg = TrainConfig(stage="pams", scale=2, act_grid="relu-unsigned", skip="fp")
    save_state(tmp_path / "last.pt", model, None, 1, cfg, np.random.default_rng(0), 0.0)
    sd, meta = read_state_dict(tmp_path / "last.pt")
    assert meta == {"stage": "pams", "arch": "edsr_baseline", "scale": "2", "act_grid": "relu-unsigned", "skip": "fp"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


def test_float16_storage_halves_the_kernels_and_loads_as_their_rounding(tmp_path: Path) -> None:
    """``storage="float16"``: 4-D kernels stored as half floats (the loaded model holds exactly their
    rounding), everything else as it was; a kernel beyond float16's range is refused, not stored as inf."""
    from cadyq_cli.checkpoint import load_model_file

    model = _model()
    save_weights(model, tmp_path / "f32.safetensors")
    save_weights(model, tmp_path / "f16.safetensors", storage="float16")
    small, big = (tmp_path / "f16.safetensors").stat().st_size, (tmp_path / "f32.safetensors").stat().st_size
    assert small < 0.55 * big
    back = load_model_file(tmp_path / "f16.safetensors").state_dict()
    for k, v in model.state_dict().items():
        want = v.half().float() if v.ndim == 4 else v
        assert back[k].dtype == v.dtype and torch.equal(back[k], want), k
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 4)[0, 0, 0, 0] = 1e5
    with pytest.raises(ValueError, match="beyond float16's range"):
        save_weights(model, tmp_path / "inf.safetensors", storage="float16")
    assert not (tmp_path / "inf.safetensors").exists()


def test_one_float16_fit_test_for_shipped_kernels_and_lean_wip_files() -> None:
    """``fits``: a value that rounds to float16's largest finite one fits, one that would become inf does not;
    non-finite values stay what they are. The lean --wip store halves exactly the tensors that fit."""
    from cadyq_cli.checkpoint import fits
    from cadyq_cli.train.wip import _half

    assert fits(torch.tensor([65510.0, -1.0]), torch.float16)  # rounds to 65504
    assert not fits(torch.tensor([65520.0]), torch.float16)  # rounds to inf
    assert fits(torch.tensor([float("inf"), float("nan"), 1.0]), torch.float16)
    for v in (torch.tensor([65510.0]), torch.tensor([65520.0]), torch.tensor([float("inf"), 2.0])):
        assert (_half(v).dtype == torch.float16) == fits(v, torch.float16)
        assert torch.equal(_half(v).float().isfinite(), v.isfinite())


def test_a_corrupt_checkpoint_is_a_read_error(tmp_path: Path) -> None:
    cfg = TrainConfig(stage="fp", scale=2)
    save_state(tmp_path / "last.pt", _model("signed", "official"), None, 1, cfg, np.random.default_rng(0), 0.0)
    blob = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointReadError, match="half.pt"):
        load_state(tmp_path / "half.pt")


def test_train_with_a_corrupt_init_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    (tmp_path / "data").mkdir()
    res = CliRunner().invoke(app, ["train", "pams", "--data", str(tmp_path / "data"), "--run", str(tmp_path / "r"),
                                   "--init", str(tmp_path / "bad.pt"), "--bf16", "off"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert any("bad.pt" in ln and "corrupt" in ln for ln in res.stderr.splitlines()), res.stderr
    assert not (tmp_path / "r").exists()
