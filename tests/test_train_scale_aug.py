"""Scale augmentation (``cadyq train --scale-aug``): the training images' downscaled copies as more HR images."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cadyq_cli.cli import app
from cadyq_cli.resize import imresize
from cadyq_cli.train.data import list_images, load_pairs, split_pairs
from cadyq_cli.train.export import _stage_info
from cadyq_cli.train.loop import train_stage
from cadyq_cli.train.state import load_state
from tests.test_train import _cfg, _log, data_dir  # noqa: F401  (data_dir: the fixture)


def test_copies_are_the_images_downscaled_and_too_small_ones_are_left_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "big.png"), big[:, :, ::-1])
    pairs = load_pairs([tmp_path / "big.png"], 2, min_lr=20, scale_aug=(0.75, 0.5))
    # 0.5 gives 30x40 HR, 15 LR rows: under the 20 a crop needs, so that copy is left out
    assert pairs.names == ["big.png", "big.png@0.75"]
    assert pairs.hr[0].shape == (60, 80, 3) and np.array_equal(pairs.hr[0], big)
    want = imresize(big, 0.75)  # MATLAB bicubic, 45x60, cropped to a multiple of the scale
    assert pairs.hr[1].shape == (44, 60, 3) and np.array_equal(pairs.hr[1], want[:44, :60])
    assert np.array_equal(pairs.lr[1], imresize(pairs.hr[1], 1 / 2))
    assert pairs.lr[1].shape == (22, 30, 3)


def test_validation_images_are_not_augmented(data_dir: Path) -> None:  # noqa: F811
    paths = list_images([data_dir])
    plain_train, plain_val = split_pairs(paths, 2, 0, 2, 16)
    train, val = split_pairs(paths, 2, 0, 2, 16, (0.8, 0.6))
    assert val.names == plain_val.names and all(np.array_equal(a, b) for a, b in zip(val.hr, plain_val.hr))
    assert len(train.names) == 3 * len(plain_train.names)  # 64 px images: 52 and 38 px copies still fit
    assert [n for n in train.names if "@" not in n] == plain_train.names


def test_a_run_trains_on_the_copies_and_records_its_factors(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    run, said = tmp_path / "r", []
    train_stage(_cfg(data_dir, run, steps=4, stop_at=2, scale_aug=[0.8]), log=said.append)
    assert any(s.startswith("data: 8 train (with copies downscaled by 0.8) / 2 val") for s in said), said
    assert load_state(run / "last.pt")["config"]["scale_aug"] == [0.8]
    assert _stage_info(run)["scale_aug"] == [0.8]  # the manifest's stage record
    train_stage(_cfg(data_dir, run, steps=4, scale_aug=[0.8, 0.6]))
    changes = [r["config_change"] for r in _log(run) if "config_change" in r]
    assert changes == [{"scale_aug": [[0.8], [0.8, 0.6]]}]


def test_a_checkpoint_without_the_setting_means_none(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "r"
    train_stage(_cfg(data_dir, run, steps=6, stop_at=2))
    assert "scale_aug" not in _stage_info(run)
    st = load_state(run / "last.pt")
    del st["config"]["scale_aug"]  # as an older cadyq saved it
    torch.save(st, run / "last.pt")
    train_stage(_cfg(data_dir, run, steps=6, stop_at=4))
    assert not [r for r in _log(run) if "config_change" in r]
    train_stage(_cfg(data_dir, run, steps=6, scale_aug=[0.8]))
    assert [r["config_change"] for r in _log(run) if "config_change" in r] == [{"scale_aug": [[], [0.8]]}]


@pytest.mark.parametrize(("value", "said"), [("1.0", "not 1"), ("0", "not 0"), ("0.8,0.8", "not 0.8,0.8"),
                                             ("-0.5", "not -0.5"), ("x", "not 'x'")])
def test_bad_factors_are_refused_in_one_line(tmp_path: Path, value: str, said: str) -> None:
    (tmp_path / "data").mkdir()
    res = CliRunner().invoke(app, ["train", "fp", "--data", str(tmp_path / "data"), "--run", str(tmp_path / "r"),
                                   "--scale-aug", value, "--bf16", "off"])
    assert res.exit_code == 2, res.output
    errs = [ln for ln in res.stderr.splitlines() if "--scale-aug" in ln]
    assert len(errs) == 1 and errs[0].endswith(said), res.stderr
    assert not (tmp_path / "r").exists()
