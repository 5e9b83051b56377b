"""The weights' moving average (``--ema``, train/ema.py) and the one-file run (``--wip``, train/wip.py).

Tiny runs on the generated images of test_train.py (16 px LR patches, batch 2, one thread).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open
from typer.testing import CliRunner

from cadyq_cli.checkpoint import load_model_file, save_weights
from cadyq_cli.cli import app
from cadyq_cli.errors import CheckpointReadError
from cadyq_cli.models import create_model
from cadyq_cli.quant.modules import set_quant_mode
from cadyq_cli.train.config import TrainConfig
from cadyq_cli.train.ema import WeightEMA, ema_decay
from cadyq_cli.train.loop import train_stage
from cadyq_cli.train.prepare import prepare_models
from cadyq_cli.train.export import export_backbone
from cadyq_cli.train.state import load_state, restore_weights, weights_state
from cadyq_cli.train.validate import validate
from cadyq_cli.train.wip import read_wip, save_wip
from tests.test_train import _cfg, _log, _val, data_dir  # noqa: F401  (data_dir: the fixture)


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("clip", torch.tensor([4.0]))
        self.register_buffer("count", torch.tensor(7))  # an integer buffer is not averaged


def test_ema_update_is_the_moving_average_of_params_and_float_buffers() -> None:
    torch.manual_seed(0)
    m = _Toy()
    ema = WeightEMA(m, 0.9)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    assert set(ema.state_dict()) == {"lin.weight", "lin.bias", "clip"}
    with torch.no_grad():
        m.lin.weight.add_(1.0)
        m.clip.fill_(6.0)
        m.count.fill_(9)
    ema.update(m, 1)
    d = ema_decay(0.9, 1)
    assert d == pytest.approx(2 / 11)  # warm-up: min(decay, (1 + n) / (10 + n))
    assert ema_decay(0.9, 1000) == 0.9
    assert torch.allclose(ema.state_dict()["lin.weight"], d * start["lin.weight"] + (1 - d) * m.lin.weight)
    assert torch.allclose(ema.state_dict()["lin.bias"], start["lin.bias"])  # unchanged weights stay
    assert float(ema.state_dict()["clip"]) == pytest.approx(d * 4.0 + (1 - d) * 6.0)
    raw = {k: v.clone() for k, v in m.state_dict().items()}
    with ema.applied(m):
        assert torch.equal(m.lin.weight, ema.state_dict()["lin.weight"]) and torch.equal(m.clip, ema.state_dict()["clip"])
        assert int(m.count) == 9
    assert all(torch.equal(v, raw[k]) for k, v in m.state_dict().items())  # the raw weights come back


@pytest.mark.parametrize("decay", ["1.0", "-0.1", "nan"])
def test_ema_out_of_range_is_refused_in_one_line(tmp_path: Path, decay: str) -> None:
    (tmp_path / "data").mkdir()
    res = CliRunner().invoke(app, ["train", "fp", "--data", str(tmp_path / "data"), "--run", str(tmp_path / "r"),
                                   "--ema", decay, "--bf16", "off"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errs = [ln for ln in res.stderr.splitlines() if "ema" in ln]
    assert len(errs) == 1 and "--ema must be a decay in [0, 1)" in errs[0] and decay in errs[0], res.stderr
    assert not (tmp_path / "r").exists()


def test_resume_is_exact_with_ema_and_a_changed_decay_is_logged(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    kw = dict(ema=0.9, val_every=2)
    train_stage(_cfg(data_dir, tmp_path / "a", **kw))
    train_stage(_cfg(data_dir, tmp_path / "b", **kw, stop_at=3))
    train_stage(_cfg(data_dir, tmp_path / "b", **kw))
    a, b = load_state(tmp_path / "a" / "last.pt"), load_state(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 6
    for part in ("model", "raw_model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # the checkpoint's model is the average (fp: no selectors, the same layout), not the raw weights
    assert all(torch.equal(a["model"][k], a["ema"][k]) for k in a["ema"])
    assert not torch.equal(a["model"]["head.0.weight"], a["raw_model"]["head.0.weight"])
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["l1"] for r in la if "l1" in r] == [r["l1"] for r in lb if "l1" in r]
    vals = [r for r in la if "val_psnr" in r]
    assert [r["step"] for r in vals] == [2, 4, 6, 6] and all(r["val_weights"] == "ema" for r in vals)
    # the same numbers (b also validated at its stop, step 3)
    assert [r["val_psnr"] for r in vals] == [r["val_psnr"] for r in lb if "val_psnr" in r and r["step"] != 3]
    train_stage(_cfg(data_dir, tmp_path / "b", ema=0.99, steps=7))
    train_stage(_cfg(data_dir, tmp_path / "b", ema=0.0, steps=8))  # off again: the checkpoint is the raw model
    changes = [r for r in _log(tmp_path / "b") if "config_change" in r]
    assert changes == [{"step": 6, "config_change": {"ema": [0.9, 0.99], "steps": [6, 7]}},
                       {"step": 7, "config_change": {"ema": [0.99, 0.0], "steps": [7, 8]}}]
    c = load_state(tmp_path / "b" / "last.pt")
    assert "raw_model" not in c and "ema" not in c
    assert "val_weights" not in _log(tmp_path / "b")[-1]
    # a run from before --ema existed: the missing setting meant off, so turning it on is a change
    st = load_state(tmp_path / "b" / "last.pt")
    del st["config"]["ema"]
    torch.save(st, tmp_path / "b" / "last.pt")
    train_stage(_cfg(data_dir, tmp_path / "b", ema=0.5, steps=8))
    assert [r for r in _log(tmp_path / "b") if "config_change" in r][-1] == {"step": 8, "config_change": {"ema": [0.0, 0.5]}}
    d = load_state(tmp_path / "b" / "last.pt")  # no step since: the average starts as a copy of the weights
    assert all(torch.equal(d["ema"][k], c["model"][k]) for k in d["ema"])


def test_validation_pick_and_export_use_the_ema_weights(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """pams and cadyq (standardized selectors, folded on save) with --ema: the validated numbers are
    those of the checkpoint's model, which is the average, and export writes exactly its tensors."""
    from cadyq_cli.train.export import _stage_info, export
    from cadyq_cli.train.select import validate_checkpoint

    fp = tmp_path / "fp"
    train_stage(_cfg(data_dir, fp, steps=2))
    pams = tmp_path / "pams"
    train_stage(_cfg(data_dir, pams, stage="pams", init=str(fp / "last.pt"), steps=3, ema=0.5))
    st = load_state(pams / "last.pt")
    assert st["config"]["ema"] == 0.5
    alphas = [k for k in st["ema"] if k.endswith(".alpha")]
    assert alphas and any(not torch.equal(st["model"][k], st["raw_model"][k]) for k in alphas)  # clips averaged too
    model = load_model_file(pams / "last.pt")
    set_quant_mode(model, "w8a8")
    final = _log(pams)[-1]
    assert final["final"] and final["val_weights"] == "ema"
    assert validate(model, _val(data_dir), False)["val_psnr"] == final["val_psnr"]
    raw = create_model("edsr_baseline", 2)
    raw.load_state_dict(st["raw_model"])
    set_quant_mode(raw, "w8a8")
    assert validate(raw, _val(data_dir), False)["val_psnr"] != final["val_psnr"]

    entry = export(pams / "last.pt", "ema-x2", tmp_path / "w", [pams], [], "generated", "")
    assert entry["stages"][0]["ema"] == 0.5 and _stage_info(pams)["ema"] == 0.5
    out = load_file(str(tmp_path / "w" / "ema-x2.safetensors"))
    assert out.keys() == st["model"].keys()
    assert all(torch.equal(out[k], st["model"][k]) for k in out)
    assert not all(torch.equal(out[k], st["raw_model"][k]) for k in out)

    cq = tmp_path / "cq"
    train_stage(_cfg(data_dir, cq, stage="cadyq", init=str(pams / "last.pt"), steps=2, ema=0.5, val_every=2,
                     keep_val=True))
    recs = [r for r in _log(cq) if "val_psnr" in r]
    assert all(r["val_weights"] == "ema" for r in recs)
    kept = validate_checkpoint(cq / "step00002.pt")  # select validates (and picks) the kept average
    assert kept == {k: recs[0][k] for k in ("val_psnr", "val_fab", "val_psnr_w8a8")}
    cst = load_state(cq / "last.pt")
    sel = "body.0.bitsel1.net_small.0.weight"
    assert not torch.equal(cst["model"][sel], cst["raw_model"][sel]) and cst["selector_train"]


def test_wip_file_continues_a_run_whose_folder_is_gone(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    wip = tmp_path / "weights" / "wip" / "x2.safetensors"
    run = tmp_path / "run"
    kw = dict(steps=5, ema=0.9, wip=str(wip))
    train_stage(_cfg(data_dir, run, stop_at=3, **kw))
    assert [p.name for p in wip.parent.iterdir()] == ["x2.safetensors"]  # one file, replaced in place
    w = read_wip(wip)
    assert w["step"] == 3 and w["config"]["ema"] == 0.9 and w["config"]["stop_at"] == 3
    st = load_state(run / "last.pt")
    for part, saved in (("model", st["raw_model"]), ("ema", st["ema"])):
        assert w[part].keys() == saved.keys() and all(torch.equal(w[part][k], saved[k]) for k in saved)
    assert wip.stat().st_size < 3 * sum(v.numel() * 4 for v in st["model"].values())  # weights and average, no Adam

    shutil.rmtree(run)
    train_stage(_cfg(data_dir, run, stop_at=3, **kw))  # nothing to train: the loaded state is saved as is
    st = load_state(run / "last.pt")
    assert st["step"] == 3 and all(torch.equal(w["ema"][k], st["ema"][k]) for k in st["ema"])
    assert all(torch.equal(w["model"][k], st["raw_model"][k]) for k in st["raw_model"])

    shutil.rmtree(run)
    logs: list[str] = []
    train_stage(_cfg(data_dir, run, **kw), log=logs.append)
    log = _log(run)
    assert log[0] == {"step": 3, "resumed_from_wip": str(wip)}
    assert [r["step"] for r in log if "l1" in r] == [4, 5] and log[-1]["final"]
    assert any("Adam restarts" in s for s in logs)
    assert load_state(run / "last.pt")["step"] == read_wip(wip)["step"] == 5
    assert [p.name for p in wip.parent.iterdir()] == ["x2.safetensors"]
    # the file fixes what it continues: another batch is refused in one line, before anything is written
    with pytest.raises(SystemExit, match="x2.safetensors was trained with batch=2, not 4"):
        train_stage(_cfg(data_dir, tmp_path / "other", batch=4, **kw))
    assert not (tmp_path / "other").exists()


def test_lean_wip_keeps_the_average_in_float16(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """--wip-lean: float16 tensors, the average only; the run goes on from the average."""
    run, full, lean = tmp_path / "run", tmp_path / "full.safetensors", tmp_path / "lean.safetensors"
    train_stage(_cfg(data_dir, run, steps=5, stop_at=3, ema=0.9, wip=str(full)))
    shutil.copy(run / "last.pt", tmp_path / "last.pt")
    train_stage(_cfg(data_dir, run, steps=5, stop_at=3, ema=0.9, wip=str(lean), wip_lean=True))  # saves as is
    st = load_state(run / "last.pt")
    with safe_open(str(lean), framework="pt") as f:
        keys, dtypes, meta = list(f.keys()), {f.get_tensor(k).dtype for k in f.keys()}, f.metadata()
    assert keys and all(k.startswith("model/") for k in keys) and dtypes == {torch.float16}
    assert meta["lean"] == "float16, the average only"
    assert lean.stat().st_size < 0.3 * full.stat().st_size
    w = read_wip(lean)
    assert w["ema"] is None and w["step"] == 3
    for k, v in st["model"].items():  # the checkpoint's model is the average
        assert w["model"][k].dtype == torch.float32
        assert torch.equal(w["model"][k], v.half().float()), k
    shutil.rmtree(run)
    train_stage(_cfg(data_dir, run, steps=5, stop_at=3, ema=0.9, wip=str(lean), wip_lean=True))  # from the file
    st = load_state(run / "last.pt")
    assert _log(run)[0] == {"step": 3, "resumed_from_wip": str(lean)}
    assert all(torch.equal(w["model"][k], st["raw_model"][k]) for k in st["raw_model"])  # goes on from the average
    assert all(torch.equal(w["model"][k], st["ema"][k]) for k in st["ema"])  # and the average starts there
    with pytest.raises(SystemExit, match="--wip-lean says how to keep the --wip file"):
        train_stage(_cfg(data_dir, tmp_path / "other", wip_lean=True))
    assert not (tmp_path / "other").exists()


def _standardized_model(seed: int):
    """An x2 EDSR-baseline whose first selector trains on standardized features (random statistics)."""
    torch.manual_seed(seed)
    model = create_model("edsr_baseline", 2)
    sel = model.selectors[0]
    n = sel.net_small[0].weight.shape[1]
    sel.znorm = (torch.rand(n) + 1, torch.rand(n) + 0.5)
    return model, sel


def test_lean_wip_keeps_the_averaged_selectors(tmp_path: Path) -> None:
    """A lean file of a cadyq model with an average holds the average's selectors, standardized."""
    model, sel = _standardized_model(5)
    ema = WeightEMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # the raw weights move away from the average
    cfg = TrainConfig(stage="cadyq", scale=2, act_grid="signed", skip="official", wip="w", wip_lean=True)
    save_wip(tmp_path / "w.safetensors", model, ema, 7, cfg, 1.0)
    w = read_wip(tmp_path / "w.safetensors")
    other = create_model("edsr_baseline", 2)
    restore_weights(w, other)
    with ema.applied(model):
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                assert torch.allclose(other.state_dict()[k], v, rtol=2e-3, atol=1e-4), k
        assert all(torch.equal(a, b) for a, b in zip(other.selectors[0].znorm, sel.znorm))  # kept float32
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        dtypes = {k.split("/")[0]: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {"model": torch.float16, "selector_train": torch.float32}


def test_wip_keeps_standardized_selectors(tmp_path: Path) -> None:
    """A cadyq model's selectors trained on standardized features come back in that form."""
    model, sel = _standardized_model(3)
    torch.nn.init.normal_(sel.net_small[0].weight)
    cfg = TrainConfig(stage="cadyq", scale=2, act_grid="signed", skip="official", seed=4)
    save_wip(tmp_path / "w.safetensors", model, None, 11, cfg, 60.0)
    w = read_wip(tmp_path / "w.safetensors")
    assert (w["step"], w["elapsed_s"], w["ema"], w["config"]["seed"]) == (11, 60.0, None, 4)
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("stage", "arch", "scale", "step", "steps", "act_grid", "skip")} == {
        "stage": "cadyq", "arch": "edsr_baseline", "scale": "2", "step": "11", "steps": "300000", "act_grid": "signed",
        "skip": "official"}
    assert json.loads(meta["config"])["seed"] == 4
    other = create_model("edsr_baseline", 2)
    restore_weights(w, other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(other.selectors[0].znorm[0], sel.znorm[0])
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointReadError, match="bad.safetensors"):
        read_wip(tmp_path / "bad.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "w.safetensors"]  # no temporary file left
    save_weights(model, tmp_path / "m.safetensors")  # a weights file is not a --wip file
    with pytest.raises(SystemExit, match="not a file written by cadyq train --wip"):
        read_wip(tmp_path / "m.safetensors")


def test_a_wip_file_is_an_init(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """``--init`` takes a --wip file as the checkpoint it keeps: the weight average where there is one."""
    run, full, lean = tmp_path / "run", tmp_path / "full.safetensors", tmp_path / "lean.safetensors"
    train_stage(_cfg(data_dir, run, steps=5, stop_at=3, ema=0.9, wip=str(full)))
    train_stage(_cfg(data_dir, run, steps=5, stop_at=3, ema=0.9, wip=str(lean), wip_lean=True))  # saves as is
    st = load_state(run / "last.pt")
    from_full, from_lean = load_state(full), load_state(lean)
    assert from_full["step"] == from_lean["step"] == 3 and from_full["config"]["ema"] == 0.9
    for k, v in st["model"].items():  # the average, as last.pt's model (the lean file: in float16)
        assert torch.allclose(from_full["model"][k], v, rtol=1e-6, atol=1e-7), k
        assert torch.equal(from_lean["model"][k], v.half().float()), k
    assert all(torch.equal(from_full["raw_model"][k], v) for k, v in st["raw_model"].items())
    assert not all(torch.equal(from_full["model"][k], st["raw_model"][k]) for k in st["model"])

    model, _ = prepare_models(_cfg(data_dir, tmp_path / "next", init=str(lean)), None, None)  # a new fp run
    assert all(torch.equal(v, from_lean["model"][k]) for k, v in model.state_dict().items())  # starts from it
    train_stage(_cfg(data_dir, tmp_path / "pams", stage="pams", steps=1, init=str(full)))  # and a pams stage's
    pams = load_state(tmp_path / "pams" / "last.pt")
    assert pams["step"] == 1 and pams["model"].keys() == st["model"].keys()


def test_a_full_wip_file_of_a_cadyq_run_reads_as_its_folded_average(tmp_path: Path) -> None:
    """A full --wip file keeps the raw weights and the average apart: as an --init it gives the average with the
    selectors folded back to raw features, as that run's last.pt would."""
    model, _ = _standardized_model(6)
    ema = WeightEMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    cfg = TrainConfig(stage="cadyq", scale=2, act_grid="signed", skip="official", ema=0.9, wip="w")
    save_wip(tmp_path / "w.safetensors", model, ema, 9, cfg, 1.0)
    want = weights_state(model, ema)
    got = load_state(tmp_path / "w.safetensors")
    sel = "body.0.bitsel1.net_small.0.weight"
    assert not torch.equal(want["model"][sel], want["raw_model"][sel])  # folded and averaged: not the raw form
    for part in ("model", "raw_model"):
        assert got[part].keys() == want[part].keys()
        assert all(torch.allclose(got[part][k], v, rtol=1e-5, atol=1e-6) for k, v in want[part].items()), part


def test_a_backbone_comes_from_a_run_checkpoint(tmp_path: Path) -> None:
    """A --wip file reads as a checkpoint but has no run folder to record: refused in one line, nothing written."""
    model, _ = _standardized_model(2)
    save_wip(tmp_path / "w.safetensors", model, None, 3, TrainConfig(stage="fp", scale=2), 1.0)
    with pytest.raises(SystemExit, match=r"w.safetensors: a backbone comes from an fp run's checkpoint, RUN/last.pt"):
        export_backbone(tmp_path / "w.safetensors", "bb", tmp_path / "weights")
    assert not (tmp_path / "weights").exists()
