"""Training stages on a tiny synthetic dataset: loss goes down, exact resume, checkpoints, pams, cadyq.

Kept light (one thread, 16 px LR patches, batch 2): the whole file runs in well under a minute.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cadyq_cli.checkpoint import load_model_file
from cadyq_cli.models import create_model
from cadyq_cli.quant.modules import set_quant_mode
from cadyq_cli.train.data import heldout_pairs
from cadyq_cli.train.config import TrainConfig
from cadyq_cli.train.host import bf16_helps
from cadyq_cli.train.loop import train_stage
from cadyq_cli.train.prepare import prepare_models
from cadyq_cli.train.signals import TrainingStopped
from cadyq_cli.train.state import load_state
from cadyq_cli.train.validate import validate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 64x64 textured images: smooth gradients plus oriented stripes."""
    root = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    for i in range(6):
        img = np.zeros((64, 64, 3), np.float32)
        for c in range(3):
            a, b = rng.uniform(-1, 1, 2)
            f, ph = rng.uniform(0.2, 0.8), rng.uniform(0, 6)
            img[..., c] = 128 + 40 * (a * xx + b * yy) / 64 + 60 * np.sin(f * (xx * np.cos(ph) + yy * np.sin(ph)) + ph)
        cv2.imwrite(str(root / f"im{i}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return root


def _cfg(data_dir: Path, run: Path, **kw: object) -> TrainConfig:
    base: dict = dict(
        stage="fp", arch="edsr_baseline", scale=2, data=[str(data_dir)], run_dir=str(run), steps=6, batch=2,
        lr_patch=16, lr=1e-3, bf16=False, threads=1, n_val=2, val_every=1000, log_every=1, save_every=2,
        calib_batches=2,
    )
    base.update(kw)
    return TrainConfig(**base)


def _log(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]


def _val(data_dir: Path):
    return heldout_pairs([data_dir], 2, 0, 2)


@pytest.fixture(scope="module")
def fp_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fp")
    train_stage(_cfg(data_dir, run, steps=20, bf16=bf16_helps(1)))  # bf16 where it is fast (emulated bf16 is 15x slower)
    return run


@pytest.fixture(scope="module")
def pams_run(data_dir: Path, fp_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pams")
    train_stage(_cfg(data_dir, run, stage="pams", init=str(fp_run / "last.pt"), steps=4))
    return run


def test_fp_lowers_training_loss(fp_run: Path) -> None:
    recs = [r for r in _log(fp_run) if "l1" in r]
    assert [r["step"] for r in recs] == list(range(1, 21))
    first = np.mean([r["l1"] for r in recs[:5]])
    last = np.mean([r["l1"] for r in recs[-5:]])
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("bf16", [False, True])
def test_resume_is_exact_fp(data_dir: Path, tmp_path: Path, bf16: bool) -> None:
    train_stage(_cfg(data_dir, tmp_path / "a", bf16=bf16))
    train_stage(_cfg(data_dir, tmp_path / "b", bf16=bf16, stop_at=3))
    assert load_state(tmp_path / "b" / "last.pt")["step"] == 3
    train_stage(_cfg(data_dir, tmp_path / "b", bf16=bf16))
    a = load_state(tmp_path / "a" / "last.pt")
    b = load_state(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la = [r["l1"] for r in _log(tmp_path / "a") if "l1" in r]
    lb = [r["l1"] for r in _log(tmp_path / "b") if "l1" in r]
    assert la == lb


def test_checkpoint_round_trip(data_dir: Path, fp_run: Path) -> None:
    st = load_state(fp_run / "last.pt")
    assert st["format"] == "cadyq-train-1" and st["step"] == 20
    model = create_model("edsr_baseline", 2)
    model.load_state_dict(st["model"], strict=True)
    set_quant_mode(model, "fp32")
    # the final record was computed by the in-memory model right after it was saved
    final = _log(fp_run)[-1]
    assert final["final"] and validate(model, _val(data_dir), st["config"]["bf16"])["val_psnr"] == final["val_psnr"]
    other = load_model_file(fp_run / "last.pt")
    set_quant_mode(other, "fp32")
    model.eval()
    x = torch.rand(1, 3, 12, 12) * 255
    with torch.no_grad():
        assert torch.equal(model(x)[0], other(x)[0])


def test_pams_stage(data_dir: Path, fp_run: Path, pams_run: Path) -> None:
    recs = [r for r in _log(pams_run) if "l1" in r]
    assert len(recs) == 4 and all("distill" in r for r in recs)
    sd = load_state(pams_run / "last.pt")["model"]
    alphas = {k: float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert len(alphas) == 16 * 7  # per block: 2 selectors x 3 candidates + quant_act3
    for k, a in alphas.items():
        assert a > 0 and abs(a - 10.0) > 1e-2, (k, a)  # calibrated (10 is the constructor default)
    fp_sd = load_state(fp_run / "last.pt")["model"]
    assert not torch.equal(sd["head.0.weight"], fp_sd["head.0.weight"])
    model = load_model_file(pams_run / "last.pt")
    assert model.arch == "edsr_baseline" and model.scale == 2
    set_quant_mode(model, "w8a8")
    final = _log(pams_run)[-1]
    assert validate(model, _val(data_dir), False)["val_psnr"] == final["val_psnr"]


@pytest.mark.parametrize("shift", [False, True])
def test_cadyq_stage_and_resume(data_dir: Path, pams_run: Path, tmp_path: Path, shift: bool) -> None:
    """A cadyq run stopped and resumed equals an uninterrupted one, key for key (with --act-shift too: its
    per-selector Adam groups and their rates resume as they were)."""
    init = str(pams_run / "last.pt")
    kw = dict(stage="cadyq", init=init, steps=3, bf16=True, act_shift=shift)
    train_stage(_cfg(data_dir, tmp_path / "a", **kw))
    train_stage(_cfg(data_dir, tmp_path / "b", **kw, stop_at=2))
    # resuming without --init keeps the teacher (taken from the checkpoint's config)
    train_stage(_cfg(data_dir, tmp_path / "b", **{**kw, "init": None}))
    a = load_state(tmp_path / "a" / "last.pt")
    b = load_state(tmp_path / "b" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert sum(k.endswith(".act_shift") for k in a["model"]) == (32 if shift else 0)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    recs = [r for r in _log(tmp_path / "a") if "l1" in r]
    assert len(recs) == 3
    for r in recs:
        assert 4.0 <= r["fab"] <= 8.0 and 4.0 <= r["soft_bits"] <= 8.0
        assert "at" in r and "distill" in r
    assert [r["at"] for r in recs] == [r["at"] for r in _log(tmp_path / "b") if "l1" in r]
    start = load_state(pams_run / "last.pt")["model"]
    sel_keys = [k for k in start if ".net_small." in k]
    assert len(sel_keys) == 64
    assert sum(not torch.equal(start[k], a["model"][k]) for k in sel_keys) == len(sel_keys)  # all got gradients
    # the pams 8-bit clip seeds the three candidates
    assert a["model"]["body.0.bitsel1.quant_bit1.alpha"].item() != 10.0


def test_cadyq_bit_loss_lowers_fab(data_dir: Path, pams_run: Path, tmp_path: Path) -> None:
    start = load_model_file(pams_run / "last.pt")  # dynamic mode, fresh selectors: 8 bits everywhere
    val = _val(data_dir)
    assert validate(start, val, False)["val_fab"] == 8.0
    run = tmp_path / "c"
    train_stage(_cfg(data_dir, run, stage="cadyq", init=str(pams_run / "last.pt"), steps=6,
                     bit_weight_max=50.0, bit_ramp_steps=1, selector_lr=0.05))
    log = _log(run)
    recs = [r for r in log if "l1" in r]
    assert np.mean([r["soft_bits"] for r in recs[-3:]]) < np.mean([r["soft_bits"] for r in recs[:3]]) - 0.5
    assert log[-1]["val_fab"] < 7.0


def test_bit_target_hinges_the_bit_loss() -> None:
    """--bit-target: the bit loss is weight * max(0, expected bits - budget); without one, weight * expected bits."""
    from cadyq_cli.train.losses import stage_loss

    torch.manual_seed(0)  # the fresh weights and the Gumbel noise
    m = create_model("edsr_baseline", scale=2)
    set_quant_mode(m, "dynamic")
    m.train()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 255
    sr, bits = m(x)
    y = sr.detach() + 1.0
    lb = float(m.soft_bits().mean().detach())
    assert 4.0 < lb < 8.0
    losses = {}
    for target in (None, 4.0, lb - 0.5, 8.0):
        cfg = TrainConfig(stage="cadyq", bit_weight_max=0.5, bit_ramp_steps=1, distill_weight=0.0, bit_target=target)
        loss, parts = stage_loss(cfg, 10, m, sr, y, None, bits, None)
        assert float(parts["soft_bits"]) == pytest.approx(lb)  # the log keeps the expected bits themselves
        losses[target] = float(loss.detach() - parts["l1"])  # the bit loss alone
    assert losses[None] == pytest.approx(0.5 * lb, rel=1e-5)
    assert losses[4.0] == pytest.approx(0.5 * (lb - 4.0), rel=1e-4)
    assert losses[lb - 0.5] == pytest.approx(0.25, rel=1e-3)
    assert losses[8.0] == 0.0  # under the budget bits cost nothing


def test_bit_target_keeps_bits_under_a_loose_budget(data_dir: Path, pams_run: Path, tmp_path: Path) -> None:
    """The heavy bit weight that lowers FAB (test above) pulls far less with a budget of 8 bits (nothing is over it)."""
    soft = {}
    for target in (None, 8.0):
        run = tmp_path / f"t{target}"
        train_stage(_cfg(data_dir, run, stage="cadyq", init=str(pams_run / "last.pt"), steps=6,
                         bit_weight_max=50.0, bit_ramp_steps=1, selector_lr=0.05, bit_target=target))
        soft[target] = np.mean([r["soft_bits"] for r in _log(run) if "l1" in r][-3:])
        assert load_state(run / "last.pt")["config"]["bit_target"] == target
    assert soft[8.0] > soft[None] + 0.5


def test_bit_target_refused_outside_4_to_8_and_the_cadyq_stage(tmp_path: Path, data_dir: Path) -> None:
    from cadyq_cli.train.config import check_config

    check_config(_cfg(data_dir, tmp_path / "ok", stage="cadyq", bit_target=4.9))
    with pytest.raises(SystemExit, match="--bit-target is a FAB budget between 4 and 8 bits, not 3"):
        check_config(_cfg(data_dir, tmp_path / "x", stage="cadyq", bit_target=3.0))
    check_config(_cfg(data_dir, tmp_path / "ok8", stage="cadyq", bit_target=8.0))
    with pytest.raises(SystemExit, match="--bit-target is a FAB budget between 4 and 8 bits, not 8.1"):
        check_config(_cfg(data_dir, tmp_path / "x", stage="cadyq", bit_target=8.1))
    with pytest.raises(SystemExit, match="for the cadyq stage's bit loss; the fp and pams stages have none"):
        check_config(_cfg(data_dir, tmp_path / "x", stage="pams", bit_target=5.0))


def test_cadyq_teacher_mode(data_dir: Path, fp_run: Path, pams_run: Path) -> None:
    init = str(pams_run / "last.pt")
    cfg = _cfg(data_dir, pams_run / "unused", stage="cadyq", init=init)
    model, teacher = prepare_models(cfg, None, load_state(init))
    assert model.mode.name == "dynamic" and teacher is not None and teacher.mode.name == "w8a8"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    cfg.teacher = str(fp_run / "last.pt")  # an fp teacher has uncalibrated clips: it runs fp32
    assert prepare_models(cfg, None, load_state(init))[1].mode.name == "fp32"


def test_a_fresh_cadyq_start_reads_init_once(data_dir: Path, pams_run: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--init (also the teacher here) is read once and passed down: variants, student, teacher."""
    import cadyq_cli.train.state as state

    reads: list[str] = []
    real = state.read_checkpoint

    def counting(path: object) -> dict:
        reads.append(str(path))
        return real(path)

    monkeypatch.setattr(state, "read_checkpoint", counting)
    init = str(pams_run / "last.pt")
    train_stage(_cfg(data_dir, tmp_path / "c", stage="cadyq", init=init, minutes=0.0))
    assert reads.count(init) == 1, reads
    assert load_state(tmp_path / "c" / "last.pt")["step"] == 0


def test_selector_choice_survives_bf16_autocast(pams_run: Path) -> None:
    model = load_model_file(pams_run / "last.pt")
    x = torch.rand(2, 3, 16, 16) * 255
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, bits = model(x)
    assert float(bits.mean()) == 8.0


def test_config_changes_on_resume_are_logged_and_exported(fp_run: Path, tmp_path: Path, data_dir: Path) -> None:
    from cadyq_cli.train.export import _stage_info

    run = tmp_path / "more"
    run.mkdir()
    for f in ("last.pt", "log.jsonl"):
        (run / f).write_bytes((fp_run / f).read_bytes())
    saved = load_state(run / "last.pt")
    cfg = _cfg(data_dir, run, steps=22, bf16=False, lr=5e-4)
    cfg.bf16 = saved["config"]["bf16"]  # unchanged: the schedule and lr differ
    train_stage(cfg)
    changes = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if "config_change" in ln]
    assert changes == [{"step": 20, "config_change": {"steps": [20, 22], "lr": [1e-3, 5e-4]}}]
    assert _stage_info(run)["changes"] == changes
    assert "changes" not in _stage_info(fp_run)


def test_data_change_is_logged_by_content_not_path(fp_run: Path, tmp_path: Path, data_dir: Path) -> None:
    from cadyq_cli.train.data import data_fingerprint

    moved = tmp_path / "elsewhere" / data_dir.name  # the same images under another path
    moved.mkdir(parents=True)
    for p in data_dir.iterdir():
        (moved / p.name).write_bytes(p.read_bytes())
    assert data_fingerprint([moved]) == data_fingerprint([data_dir])
    run = tmp_path / "more"
    run.mkdir()
    for f in ("last.pt", "log.jsonl"):
        (run / f).write_bytes((fp_run / f).read_bytes())
    st = load_state(run / "last.pt")
    bf16 = st["config"]["bf16"]
    for k in ("data_id", "keep_val"):  # a checkpoint from before these settings existed
        st["config"].pop(k, None)
    torch.save(st, run / "last.pt")
    train_stage(_cfg(moved, run, steps=21, bf16=bf16))
    changes = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if "config_change" in ln]
    assert changes == [{"step": 20, "config_change": {"steps": [20, 21]}}]  # not the data
    extra = cv2.imread(str(moved / "im0.png"))
    cv2.imwrite(str(moved / "im6.png"), extra[::-1].copy())
    train_stage(_cfg(moved, run, steps=22, bf16=bf16))
    last = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if "config_change" in ln][-1]
    assert last["step"] == 21 and set(last["config_change"]) == {"steps", "data_id"}


def test_cadyq_validation_has_w8a8_reference_and_pick(data_dir: Path, pams_run: Path, tmp_path: Path) -> None:
    from cadyq_cli.train.export import _stage_info
    from cadyq_cli.train.select import materialize, pick, read_log, validate_checkpoint

    run = tmp_path / "kv"
    train_stage(_cfg(data_dir, run, stage="cadyq", init=str(pams_run / "last.pt"), steps=3, val_every=1,
                     keep_val=True, bit_weight_max=50.0, bit_ramp_steps=1, selector_lr=0.05))
    recs = [r for r in read_log(run) if "val_psnr" in r and not r.get("final")]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert (run / f"step{r['step']:05d}.pt").is_file()
    # the reference is the same weights run in w8a8
    m = load_model_file(run / "step00002.pt")
    set_quant_mode(m, "w8a8")
    assert validate(m, _val(data_dir), False)["val_psnr"] == recs[1]["val_psnr_w8a8"]
    assert "val_psnr_w8a8" not in validate(m, _val(data_dir), False)
    # validation measures what `cadyq eval --tiling paper` measures, on an image of several patches
    from cadyq_cli.evaluate import evaluate

    big = tmp_path / "big"
    big.mkdir()
    hr = cv2.imread(str(data_dir / "im0.png"))
    cv2.imwrite(str(big / "a.png"), np.tile(hr, (4, 3, 1))[:250, :190])  # LR 125x95: 2x1 patches, ragged
    set_quant_mode(m, "dynamic")
    v = validate(m, heldout_pairs([big], 1, 0, 2), False)
    ev = {r.mode: r for r in evaluate([big], 2, m, ["dynamic", "w8a8"], False).results}
    assert v["val_psnr"] == pytest.approx(ev["dynamic"].psnr, abs=1e-9)
    assert v["val_psnr_w8a8"] == pytest.approx(ev["w8a8"].psnr, abs=1e-9)
    assert v["val_fab"] == pytest.approx(ev["dynamic"].fab, abs=1e-9) and m.mode.name == "dynamic"
    again = validate_checkpoint(run / "step00002.pt")  # the split rebuilt from the checkpoint's config
    assert again == {k: recs[1][k] for k in ("val_psnr", "val_fab", "val_psnr_w8a8")}
    # pick: the lowest FAB within the gap; none when nothing is within it
    gaps = [r["val_psnr_w8a8"] - r["val_psnr"] for r in recs]
    best = pick(recs, max(gaps) + 1)
    assert best["val_fab"] == min(r["val_fab"] for r in recs)
    assert pick(recs, min(gaps) - 1) is None
    assert pick(recs, max(gaps) + 1, kept={3})["step"] == 3  # only steps with a checkpoint
    out = materialize(run, 2, tmp_path / "picked")
    assert torch.equal(load_state(out)["model"]["body.0.bitsel1.net_small.0.weight"],
                       load_state(run / "step00002.pt")["model"]["body.0.bitsel1.net_small.0.weight"])
    assert max(r["step"] for r in read_log(tmp_path / "picked")) == 2
    info = _stage_info(tmp_path / "picked")
    assert info["steps"] == 2 and info["final_val_psnr_w8a8"] == round(recs[1]["val_psnr_w8a8"], 3)


def test_sigterm_stops_cleanly_after_the_current_step(data_dir: Path, tmp_path: Path) -> None:
    import os
    import signal

    run = tmp_path / "sig"
    sent: list[str] = []

    def log(line: str) -> None:
        if line.startswith('{"step": 2,') and not sent:
            sent.append(line)
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped) as e:
        train_stage(_cfg(data_dir, run, steps=50, save_every=1000, keep_val=True, val_every=1000), log=log)
    assert e.value.signum == signal.SIGTERM
    assert sent, "the run never logged step 2"
    assert (run / "step00002.pt").is_file()  # keep_val keeps the final state too
    assert load_state(run / "last.pt")["step"] == 2  # saved at the signal, not at a save interval
    final = _log(run)[-1]
    assert final["final"] and final["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the accelerator machine)")
def test_cadyq_on_cuda_resumes_exactly_and_loads_on_cpu(data_dir: Path, pams_run: Path, tmp_path: Path) -> None:
    kw = dict(stage="cadyq", init=str(pams_run / "last.pt"), steps=3, device="cuda", bf16=True)
    train_stage(_cfg(data_dir, tmp_path / "a", **kw))
    train_stage(_cfg(data_dir, tmp_path / "b", **kw, stop_at=2))
    train_stage(_cfg(data_dir, tmp_path / "b", **kw))
    a = load_state(tmp_path / "a" / "last.pt")
    b = load_state(tmp_path / "b" / "last.pt")
    assert all(v.device.type == "cpu" for v in a["model"].values())  # portable checkpoint
    for k in a["model"]:  # cuDNN's conv backward is not bitwise deterministic: close, not equal
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), rtol=1e-3, atol=1e-4), k
    model = load_model_file(tmp_path / "a" / "last.pt")
    assert validate(model, _val(data_dir), False)["val_psnr"] == pytest.approx(_log(tmp_path / "a")[-1]["val_psnr"], abs=0.05)


def test_cuda_request_without_cuda_is_refused(data_dir: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        train_stage(_cfg(data_dir, tmp_path / "r", device="cuda"))
    assert not (tmp_path / "r").exists()


def test_validation_runs_on_its_own_interval_not_only_on_log_steps(data_dir: Path, tmp_path: Path) -> None:
    """--val-every that is not a multiple of the log interval still validates (the default 250 with logs every 20)."""
    run = tmp_path / "v"
    train_stage(_cfg(data_dir, run, steps=6, log_every=4, val_every=3))
    recs = [r for r in _log(run) if not r.get("final")]
    assert [r["step"] for r in recs if "val_psnr" in r] == [3, 6]
    assert [r["step"] for r in recs] == [3, 4, 6]


def test_act_grid_is_chosen_at_pams_inherited_and_kept(data_dir: Path, fp_run: Path, pams_run: Path, tmp_path: Path) -> None:
    """--act-grid relu-unsigned: set on a pams run from fp, inherited by cadyq, recorded in every
    checkpoint and in the loaded model; changing it later is refused in one line."""
    u = tmp_path / "pams_u"
    train_stage(_cfg(data_dir, u, stage="pams", init=str(fp_run / "last.pt"), steps=2, act_grid="relu-unsigned"))
    assert load_state(u / "last.pt")["config"]["act_grid"] == "relu-unsigned"
    pams_model = load_model_file(u / "last.pt")
    assert pams_model.act_grid == "relu-unsigned" and sum(not s.signed for s in pams_model.selectors) == 16
    # the unsigned clips differ from the signed run's: both calibrate, but they train on other grids
    c = tmp_path / "cadyq_u"
    train_stage(_cfg(data_dir, c, stage="cadyq", init=str(u / "last.pt"), steps=2))  # no --act-grid: inherited
    st = load_state(c / "last.pt")
    assert st["config"]["act_grid"] == "relu-unsigned"
    model = load_model_file(c / "last.pt")
    assert model.act_grid == "relu-unsigned"
    assert validate(model, _val(data_dir), False)["val_psnr"] == _log(c)[-1]["val_psnr"]
    with pytest.raises(SystemExit, match="learned for relu-unsigned"):
        train_stage(_cfg(data_dir, tmp_path / "bad", stage="cadyq", init=str(u / "last.pt"), steps=2, act_grid="signed"))
    with pytest.raises(SystemExit, match="learned for signed"):  # older and signed checkpoints: signed
        train_stage(_cfg(data_dir, tmp_path / "bad2", stage="cadyq", init=str(pams_run / "last.pt"), steps=2,
                         act_grid="relu-unsigned"))
    with pytest.raises(SystemExit, match="was trained with --act-grid relu-unsigned"):
        train_stage(_cfg(data_dir, c, stage="cadyq", steps=3, act_grid="signed"))
    with pytest.raises(SystemExit, match="--act-grid must be one of"):
        train_stage(_cfg(data_dir, tmp_path / "bad3", stage="pams", init=str(fp_run / "last.pt"), act_grid="ternary"))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad3").exists()


def test_act_shift_is_learned_from_zero_inherited_and_kept(data_dir: Path, pams_run: Path, tmp_path: Path) -> None:
    """--act-shift on a cadyq run from a pams run without shifts: every selector's shift starts at zero and
    learns, the checkpoint and the loaded model have them, a run from it keeps them without the flag, and
    dropping them (at a start or a resume) or asking for them on an fp stage is refused in one line."""
    c = tmp_path / "cadyq_s"
    train_stage(_cfg(data_dir, c, stage="cadyq", init=str(pams_run / "last.pt"), steps=3, act_shift=True))
    st = load_state(c / "last.pt")
    assert st["config"]["act_shift"] is True
    shifts = [v for k, v in st["model"].items() if k.endswith(".act_shift")]
    assert len(shifts) == 32 and all(float(v.abs().max()) > 0 for v in shifts)
    model = load_model_file(c / "last.pt")
    assert model.act_shift
    assert validate(model, _val(data_dir), False)["val_psnr"] == _log(c)[-1]["val_psnr"]
    c2 = tmp_path / "cadyq_s2"
    train_stage(_cfg(data_dir, c2, stage="cadyq", init=str(c / "last.pt"), steps=2))  # no flag: inherited
    assert load_state(c2 / "last.pt")["config"]["act_shift"] is True
    train_stage(_cfg(data_dir, c, stage="cadyq", steps=4))  # a resume keeps them
    assert load_model_file(c / "last.pt").act_shift
    with pytest.raises(SystemExit, match="learned input shifts"):
        train_stage(_cfg(data_dir, tmp_path / "bad", stage="cadyq", init=str(c / "last.pt"), steps=2, act_shift=False))
    with pytest.raises(SystemExit, match="was trained with --act-shift"):
        train_stage(_cfg(data_dir, c, stage="cadyq", steps=5, act_shift=False))
    with pytest.raises(SystemExit, match="for the pams and cadyq stages"):
        train_stage(_cfg(data_dir, tmp_path / "bad2", act_shift=True))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_fp_skip_starts_from_an_official_skip_pams_and_is_kept(data_dir: Path, pams_run: Path, tmp_path: Path) -> None:
    """--skip fp may start from a pams run (same weights and clips), is recorded, and a resume
    cannot change it."""
    c = tmp_path / "cadyq_f"
    train_stage(_cfg(data_dir, c, stage="cadyq", init=str(pams_run / "last.pt"), steps=2, skip="fp"))
    assert load_state(c / "last.pt")["config"]["skip"] == "fp"
    model = load_model_file(c / "last.pt")
    assert model.skip == "fp" and all(b.fp_skip for b in model.body[:-1])
    assert validate(model, _val(data_dir), False)["val_psnr"] == _log(c)[-1]["val_psnr"]
    with pytest.raises(SystemExit, match="was trained with --skip fp"):
        train_stage(_cfg(data_dir, c, stage="cadyq", steps=3, skip="official"))
    d = tmp_path / "cadyq_f2"
    train_stage(_cfg(data_dir, d, stage="cadyq", init=str(c / "last.pt"), steps=1))  # inherited
    assert load_state(d / "last.pt")["config"]["skip"] == "fp"
    with pytest.raises(SystemExit, match="--skip must be one of official"):
        train_stage(_cfg(data_dir, tmp_path / "bad", stage="cadyq", arch="carn", init=str(c / "last.pt"), skip="fp"))


def test_multi_scale_carn_trains_every_scale_and_resumes_exactly(data_dir: Path, tmp_path: Path) -> None:
    """``scales``: a batch of each scale in turn, so every upsampler of the one CARN learns (with one scale only
    its own does); validation per scale and the mean; a stopped run resumes to the same weights."""
    kw = dict(arch="carn", scale=4, lr_patch=12, val_every=4, steps=4)
    train_stage(_cfg(data_dir, tmp_path / "multi", scales=[2, 3, 4], **kw))
    train_stage(_cfg(data_dir, tmp_path / "one", **kw))
    torch.manual_seed(0)
    fresh, _ = prepare_models(_cfg(data_dir, tmp_path / "x", **kw), None, None)
    init = fresh.state_dict()
    multi = load_state(tmp_path / "multi" / "last.pt")["model"]
    one = load_state(tmp_path / "one" / "last.pt")["model"]
    for s in (2, 3, 4):
        keys = [k for k in init if k.startswith(f"upsample.up{s}.")]
        assert keys and all(not torch.equal(multi[k], init[k]) for k in keys), s
        assert all(torch.equal(one[k], init[k]) for k in keys) == (s != 4), s
    val = [r for r in _log(tmp_path / "multi") if "val_psnr" in r]
    assert len(val) == 2 and val[-1]["final"]
    for r in val:
        per = [r[f"val_psnr_x{s}"] for s in (2, 3, 4)]
        assert r["val_psnr"] == pytest.approx(np.mean(per)) and per[0] > per[2]  # x2 is the easiest
    train_stage(_cfg(data_dir, tmp_path / "stopped", scales=[2, 3, 4], stop_at=3, **kw))
    train_stage(_cfg(data_dir, tmp_path / "stopped", scales=[2, 3, 4], **kw))
    again = load_state(tmp_path / "stopped" / "last.pt")["model"]
    assert all(torch.equal(again[k], multi[k]) for k in multi)
    with pytest.raises(SystemExit, match="was trained with scales"):  # a resume keeps its scales
        train_stage(_cfg(data_dir, tmp_path / "stopped", scales=[2, 4], **kw))


def test_multi_scale_carn_quantizes_every_scale(data_dir: Path, tmp_path: Path) -> None:
    """pams and cadyq on a multi-scale CARN: a batch of each scale in turn against the teacher at that scale,
    every upsampler trained, validation (dynamic and w8a8) per scale; one file serves each scale."""
    kw = dict(arch="carn", scale=4, scales=[2, 3, 4], lr_patch=12, val_every=6, steps=6)
    train_stage(_cfg(data_dir, tmp_path / "fp", **kw))
    train_stage(_cfg(data_dir, tmp_path / "pams", stage="pams", init=str(tmp_path / "fp" / "last.pt"), **kw))
    train_stage(_cfg(data_dir, tmp_path / "cq", stage="cadyq", init=str(tmp_path / "pams" / "last.pt"), **kw))
    before = load_state(tmp_path / "pams" / "last.pt")["model"]
    after = load_state(tmp_path / "cq" / "last.pt")["model"]
    for s in (2, 3, 4):
        keys = [k for k in before if k.startswith(f"upsample.up{s}.")]
        assert keys and all(not torch.equal(after[k], before[k]) for k in keys), s
    last = _log(tmp_path / "cq")[-1]
    assert last["final"] and all(f"{k}_x{s}" in last for k in ("val_psnr", "val_fab", "val_psnr_w8a8") for s in (2, 3, 4))
    assert last["val_psnr_x2"] > last["val_psnr_x4"]
    for s in (2, 3, 4):  # the cadyq checkpoint runs at every scale
        m = load_model_file(tmp_path / "cq" / "last.pt", "carn", s)
        y, _ = m(torch.rand(1, 3, 10, 12) * 255)
        assert y.shape == (1, 3, 10 * s, 12 * s)
    # a source trained at one scale has untrained upsamplers: refused as --init and as --teacher
    one = {k: v for k, v in kw.items() if k != "scales"} | {"steps": 1}
    train_stage(_cfg(data_dir, tmp_path / "fp4", **one))
    with pytest.raises(SystemExit, match="fp4/last.pt was trained at x4 only, not at x2, x3"):
        train_stage(_cfg(data_dir, tmp_path / "bad", stage="pams", init=str(tmp_path / "fp4" / "last.pt"), **kw))
    with pytest.raises(SystemExit, match="--teacher .*fp4/last.pt was trained at x4 only"):
        train_stage(_cfg(data_dir, tmp_path / "bad", stage="cadyq", init=str(tmp_path / "pams" / "last.pt"),
                         teacher=str(tmp_path / "fp4" / "last.pt"), **kw))
    assert not (tmp_path / "bad").exists()
    from cadyq_cli.train.export import export

    with pytest.raises(SystemExit, match="distinct scales"):
        export(tmp_path / "cq" / "last.pt", "c", tmp_path / "w", [], [], "data", "", scales=[2, 2, 4])
    with pytest.raises(SystemExit, match="trained at x4"):
        export(tmp_path / "fp4" / "last.pt", "c", tmp_path / "w", [], [], "data", "", scales=[2, 3, 4])


@pytest.mark.parametrize("arch, scales, why, stage", [("edsr_baseline", [2, 4], "multi-scale models", "fp"),
                                                      ("carn", [2, 3], "including --scale 4", "fp"),
                                                      ("carn", [2, 2, 4], "distinct", "fp"),
                                                      ("edsr_baseline", [2, 4], "multi-scale models", "pams")])
def test_scales_refused_in_one_line(data_dir: Path, tmp_path: Path, arch: str, scales: list[int], why: str,
                                    stage: str) -> None:
    with pytest.raises(SystemExit, match=why):
        train_stage(_cfg(data_dir, tmp_path / "r", arch=arch, scale=4, scales=scales, lr_patch=12, stage=stage))
    assert not (tmp_path / "r").exists()


def test_export_folds_an_operating_point(fp_run: Path, tmp_path: Path) -> None:
    """export --fold-bit-bias B: every selector's output bias moves by (+B, 0, -B) and the file and manifest say B."""
    from cadyq_cli.checkpoint import read_state_dict
    from cadyq_cli.train.export import export

    plain = export(fp_run / "last.pt", "m", tmp_path / "a", [], [], "data", "")
    folded = export(fp_run / "last.pt", "m", tmp_path / "b", [], [], "data", "", fold_bit_bias=0.75)
    sd_a, meta_a = read_state_dict(tmp_path / "a" / plain["file"])
    sd_b, meta_b = read_state_dict(tmp_path / "b" / folded["file"])
    keys = [k for k in sd_a if k.endswith("net_small.0.bias")]
    assert keys and all(torch.allclose(sd_b[k] - sd_a[k], torch.tensor([0.75, 0.0, -0.75])) for k in keys)
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a if k not in keys)
    assert "bit_bias_folded" not in meta_a and float(meta_b["bit_bias_folded"]) == 0.75
    assert folded["bit_bias_folded"] == 0.75 and "bit_bias_folded" not in plain


def test_export_folds_bit_floors(fp_run: Path, tmp_path: Path) -> None:
    """export --bit-floor L1,L2: those selectors' output biases move by (-1e4, 0, +1e4), nothing else changes, and
    the file and manifest name the layers; a name that is no selector is refused in one line, writing nothing."""
    from cadyq_cli.checkpoint import read_state_dict
    from cadyq_cli.models._base import BIT_FLOOR_BIAS
    from cadyq_cli.train.export import export

    plain = export(fp_run / "last.pt", "m", tmp_path / "a", [], [], "data", "")
    floors = ["body.0.bitsel1", "body.1.body.2"]
    floored = export(fp_run / "last.pt", "m", tmp_path / "b", [], [], "data", "", bit_floor=floors)
    sd_a, meta_a = read_state_dict(tmp_path / "a" / plain["file"])
    sd_b, meta_b = read_state_dict(tmp_path / "b" / floored["file"])
    moved = [f"{n}.net_small.0.bias" for n in floors]
    assert all(torch.allclose(sd_b[k] - sd_a[k], torch.tensor([-BIT_FLOOR_BIAS, 0.0, BIT_FLOOR_BIAS])) for k in moved)
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a if k not in moved)
    assert json.loads(meta_b["bit_floor"]) == floors and "bit_floor" not in meta_a
    assert floored["bit_floor"] == floors and "bit_floor" not in plain
    with pytest.raises(SystemExit, match="--bit-floor: no bit selector 'body.0.bitsel9'"):
        export(fp_run / "last.pt", "m", tmp_path / "c", [], [], "data", "", bit_floor=["body.0.bitsel9"])
    assert not (tmp_path / "c").exists()


def test_export_checks_that_its_metrics_measured_the_stored_weights(fp_run: Path, data_dir: Path, tmp_path: Path) -> None:
    """An eval JSON records the digest of the weights it measured, and export refuses one that measured other
    weights than the file it writes: float32 storage takes the checkpoint's evaluation (the same tensors),
    float16 only the stored file's; a JSON without a digest passes for float32 only. Nothing is written on refusal."""
    from cadyq_cli.evaluate import evaluate, results_to_json
    from cadyq_cli.train.export import export
    from cadyq_cli.weights import load_model

    ckpt = fp_run / "last.pt"

    def eval_json(weights: Path, name: str) -> Path:
        net = load_model(weights=weights, scale=2, mode="fp32")
        out = tmp_path / name
        out.write_text(json.dumps(results_to_json(evaluate([data_dir], 2, net, ["fp32"], False, "paper", limit=1))))
        return out

    of_ckpt = eval_json(ckpt, "ckpt.json")
    entry = export(ckpt, "m", tmp_path / "a", [], [of_ckpt], "data", "")
    assert entry["metrics"][data_dir.name]["fp32"]["psnr"] > 0
    digest = json.loads(of_ckpt.read_text())["weights_digest"]
    assert json.loads(eval_json(tmp_path / "a" / "m.safetensors", "f32.json").read_text())["weights_digest"] == digest
    with pytest.raises(SystemExit, match="measured other weights than .* stored as float16"):
        export(ckpt, "m", tmp_path / "b", [], [of_ckpt], "data", "", storage="float16")
    assert not (tmp_path / "b").exists()
    export(ckpt, "m", tmp_path / "c", [], [], "data", "", storage="float16")
    of_stored = eval_json(tmp_path / "c" / "m.safetensors", "f16.json")
    assert json.loads(of_stored.read_text())["weights_digest"] != digest  # float16 rounded some kernel
    half = export(ckpt, "m", tmp_path / "c", [], [of_stored], "data", "", storage="float16")
    assert half["metrics"][data_dir.name]["fp32"]["psnr"] == round(json.loads(of_stored.read_text())["results"][0]["psnr"], 4)
    old = json.loads(of_ckpt.read_text())
    del old["weights_digest"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="records no weights digest"):
        export(ckpt, "m", tmp_path / "d", [], [tmp_path / "old.json"], "data", "", storage="float16")
    assert not (tmp_path / "d").exists()
    export(ckpt, "m", tmp_path / "d", [], [tmp_path / "old.json"], "data", "")
    # a folded bit bias changes the tensors: only the exported file's evaluation measured them
    with pytest.raises(SystemExit, match="with bit bias 0.5 folded"):
        export(ckpt, "m", tmp_path / "e", [], [of_ckpt], "data", "", fold_bit_bias=0.5)
    with pytest.raises(SystemExit, match="records no weights digest"):
        export(ckpt, "m", tmp_path / "e", [], [tmp_path / "old.json"], "data", "", fold_bit_bias=0.5)
    export(ckpt, "m", tmp_path / "e", [], [], "data", "", fold_bit_bias=0.5)
    of_folded = eval_json(tmp_path / "e" / "m.safetensors", "folded.json")
    export(ckpt, "m", tmp_path / "e", [], [of_folded], "data", "", fold_bit_bias=0.5)
    # so do bit floors
    with pytest.raises(SystemExit, match="with bit floors folded"):
        export(ckpt, "m", tmp_path / "f", [], [of_ckpt], "data", "", bit_floor=["body.0.bitsel1"])
    with pytest.raises(SystemExit, match="records no weights digest"):
        export(ckpt, "m", tmp_path / "f", [], [tmp_path / "old.json"], "data", "", bit_floor=["body.0.bitsel1"])
    assert not (tmp_path / "f").exists()
    # an entry's metrics stay only while its file is the same
    assert export(ckpt, "m", tmp_path / "c", [], [], "data", "", storage="float16")["metrics"] == half["metrics"]
    assert export(ckpt, "m", tmp_path / "a", [], [], "data", "", fold_bit_bias=0.5)["metrics"] == {}
    # bicubic rows alone measured no model; a file that is no eval output is one line
    bicubic = tmp_path / "bicubic.json"
    bicubic.write_text(json.dumps(results_to_json(evaluate([data_dir], 2, None, [], True, "paper", limit=1))))
    export(ckpt, "m", tmp_path / "c", [], [bicubic], "data", "", storage="float16")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(SystemExit, match="junk.json: not a `cadyq eval --json` file"):
        export(ckpt, "m", tmp_path / "c", [], [tmp_path / "junk.json"], "data", "")


def test_export_refuses_a_folded_bias_on_a_backbone(fp_run: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "cadyq_cli.train.export", str(fp_run / "last.pt"), "--name", "b",
                          "--weights-dir", str(tmp_path), "--backbone", "--fold-bit-bias", "0.5"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--fold-bit-bias" in res.stderr and not list(tmp_path.iterdir())
