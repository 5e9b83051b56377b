"""bench/_model_args.run_split: the validation benchmarks (bench/dial_val.py, bench/variants.py) run a training
checkpoint on its own held-out split, read from its config, and a shipped file on the recipes' split."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from cadyq_cli.models import create_model
from cadyq_cli.train.config import TrainConfig
from cadyq_cli.train.wip import save_wip

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from _model_args import RECIPE_SPLIT, run_split, validation_pairs  # noqa: E402


def test_a_wip_file_gives_its_runs_split(tmp_path: Path) -> None:
    wip = tmp_path / "run.safetensors"
    cfg = TrainConfig(stage="fp", scale=2, data=["/elsewhere/T91", "/elsewhere/mine"], n_val=4, seed=7, wip=str(wip))
    save_wip(wip, create_model("edsr_baseline", 2), None, 5, cfg, 1.0)  # type: ignore[arg-type]
    assert run_split(str(wip)) == {"data": ["T91", "mine"], "n_val": 4, "seed": 7}


def test_a_training_checkpoint_gives_its_runs_split(tmp_path: Path) -> None:
    from cadyq_cli.train.state import save_state

    cfg = TrainConfig(stage="fp", scale=2, data=["/a/BSD200"], n_val=3, seed=5)
    save_state(tmp_path / "last.pt", create_model("edsr_baseline", 2), None, 5, cfg, np.random.default_rng(0),  # type: ignore[arg-type]
               1.0)
    assert run_split(str(tmp_path / "last.pt")) == {"data": ["BSD200"], "n_val": 3, "seed": 5}


def test_a_shipped_file_gives_the_recipes_split(weights_x2: Path) -> None:
    assert run_split(str(weights_x2)) == RECIPE_SPLIT == run_split(None)


def test_a_missing_training_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "T91").mkdir()
    with pytest.raises(SystemExit, match=r"no training folder .*mine \(give --data-root, the folder holding T91, mine\)"):
        validation_pairs(tmp_path, 2, split={"data": ["T91", "mine"], "n_val": 2, "seed": 0})
