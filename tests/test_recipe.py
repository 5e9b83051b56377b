"""Recipes as data: a tiny recipe end to end (fp → pams → cadyq → pick → eval → export), a
time-budget stop and resume, a start from a backbone file, refused recipes, and the shipped recipes
against the manifest."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cadyq_cli.cli import app
from cadyq_cli.train.recipe import load_recipe, recipes_dir, run_recipe
from cadyq_cli.weights import file_sha256, list_backbones, list_weights, list_wip, load_model

TINY = """\
name = "tiny-x2"
arch = "edsr_baseline"
scale = 2
data_root = "{root}"
data = ["hr"]
notes = "a test recipe"
{start}

[defaults]
batch = 2
lr_patch = 16
n_val = 2
log_every = 1
save_every = 2
calib_batches = 2
bf16 = false
seed = 0

[[stages]]
run = "fp"
stage = "fp"
steps = 6
lr = 1e-3
val_every = 1000
{backbone}

[[stages]]
run = "pams"
stage = "pams"
init = "fp"
steps = 6
stop_at = 4
lr = 1e-4
val_every = 1000

[[stages]]
run = "cq"
stage = "cadyq"
init = "pams"
steps = 8
stop_at = 4
lr = 5e-5
bit_weight_max = 0.3
bit_ramp_steps = 2
selector_lr = 5e-3
val_every = 2
keep_val = true

[[stages]]
run = "cq2"
continue = "cq"
stage = "cadyq"
steps = 8
stop_at = 6
lr = 5e-5
bit_weight_max = 0.5
bit_ramp_steps = 2
selector_lr = 5e-3
val_every = 2
keep_val = true

[[stages]]
run = "cq2"
steps = 12
stop_at = 8
lr = 5e-5
bit_weight_max = 0.5
bit_ramp_steps = 2
selector_lr = 5e-3
val_every = 2
keep_val = true

[pick]
runs = ["cq", "cq2"]
max_gap = 100.0

[eval]
root = "{root}"
sets = [{{name = "bench", limit = 1}}]
modes = ["w8a8", "dynamic"]
tiling = "paper"
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training images (six 64x64 textures) under hr/, two benchmark images under bench/."""
    root = tmp_path_factory.mktemp("recipe_data")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    for folder, n in (("hr", 6), ("bench", 2)):
        (root / folder).mkdir()
        for i in range(n):
            img = np.zeros((64, 64, 3), np.float32)
            for c in range(3):
                f, ph = rng.uniform(0.2, 0.8), rng.uniform(0, 6)
                img[..., c] = 128 + 30 * (xx - yy) / 64 + 60 * np.sin(f * (xx * np.cos(ph) + yy * np.sin(ph)) + ph)
            cv2.imwrite(str(root / folder / f"im{i}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return root


def _write(root: Path, name: str, start: str = "", backbone: str = "") -> Path:
    path = root / f"{name}.toml"
    path.write_text(TINY.format(root=root, start=start, backbone=backbone))
    return path


@pytest.fixture(scope="module")
def whole(root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny recipe run in one invocation."""
    run_dir = tmp_path_factory.mktemp("whole")
    res = run_recipe(load_recipe(_write(root, "tiny")), run_dir, minutes=10, threads=1)
    return res, run_dir


def test_tiny_recipe_runs_end_to_end_and_the_export_loads(whole) -> None:
    res, run_dir = whole
    assert res.finished and res.export is not None and res.export.is_file()
    state = json.loads((run_dir / "recipe.json").read_text())
    assert state["segments_done"] == 5 and state["eval_done"] == ["bench"]
    assert state["pick"]["run"] in ("cq", "cq2") and state["pick"]["step"] in (2, 4, 6, 8)
    # the pick is the validated, kept step the export holds
    assert (run_dir / "pick" / "last.pt").is_file()
    manifest = json.loads((res.export.parent / "manifest.json").read_text())
    entry = manifest["models"][0]
    assert entry["name"] == "tiny-x2" and entry["sha256"] == res.sha256 and entry["recipe"] == "tiny"
    assert [s["stage"] for s in entry["stages"]] == ["fp", "pams", "cadyq"]
    assert entry["stages"][-1]["changes"][0]["config_change"]["bit_weight_max"] == [0.3, 0.5]
    assert set(entry["metrics"]["bench"]) == {"w8a8", "dynamic"}
    # the continuation ran on the longer schedule after its first segment: logged as a change
    changes = [json.loads(ln) for ln in (run_dir / "cq2" / "log.jsonl").read_text().splitlines() if "config_change" in ln]
    assert [c["step"] for c in changes] == [4, 6]
    net = load_model(weights=res.export, scale=2, mode="dynamic", kernels="float")
    with torch.inference_mode():
        y, bits = net(torch.rand(1, 3, 20, 20) * 255)
    assert y.shape == (1, 3, 40, 40) and set(bits.unique().tolist()) <= {4, 6, 8}


def test_a_multi_scale_recipe_ships_one_file_with_an_entry_per_scale(root: Path, tmp_path: Path) -> None:
    """scales on every stage (CARN): eval at each scale, one exported file, entries NAME-x2 ... each with its
    own scale's metrics, and the file runs at every scale. With ``storage = "float16"`` the file holds half
    floats and the metrics are those of that file, not of the float32 checkpoint."""
    text = (TINY.format(root=root, start="", backbone="").replace('name = "tiny-x2"', 'name = "tinyc"')
            .replace('arch = "edsr_baseline"\nscale = 2', 'arch = "carn"\nscale = 4')
            .replace("lr_patch = 16", "lr_patch = 12\nscales = [2, 3, 4]")
            .replace('modes = ["w8a8", "dynamic"]', 'modes = ["fp32", "w8a8", "dynamic"]')) + '\n[export]\nstorage = "float16"\n'
    path = tmp_path / "tinyc.toml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.scales == [2, 3, 4]
    res = run_recipe(recipe, tmp_path / "run", minutes=10, threads=1)
    assert res.finished and res.export is not None and res.export.name == "tinyc.safetensors"
    state = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert state["eval_done"] == ["bench_x2", "bench_x3", "bench_x4"]
    manifest = json.loads((res.export.parent / "manifest.json").read_text())
    entries = {m["name"]: m for m in manifest["models"]}
    assert sorted(entries) == ["tinyc-x2", "tinyc-x3", "tinyc-x4"]
    psnr = {}
    for s in (2, 3, 4):
        e = entries[f"tinyc-x{s}"]
        assert (e["file"], e["scale"], e["scales"], e["sha256"]) == ("tinyc.safetensors", s, [2, 3, 4], res.sha256)
        psnr[s] = e["metrics"]["bench"]["w8a8"]["psnr"]
        ev = json.loads((tmp_path / "run" / "eval" / f"bench_x{s}.json").read_text())
        w8a8 = next(r for r in ev["results"] if r["mode"] == "w8a8")
        assert ev["scale"] == s and w8a8["psnr"] == pytest.approx(psnr[s], abs=1e-4)
        net = load_model(weights=res.export, scale=s, mode="dynamic", kernels="float")
        with torch.inference_mode():
            y, _ = net(torch.rand(1, 3, 10, 12) * 255)
        assert y.shape == (1, 3, 10 * s, 12 * s)
    assert len(set(psnr.values())) == 3  # each entry holds its own scale's numbers
    from cadyq_cli.checkpoint import read_state_dict
    from cadyq_cli.evaluate import evaluate

    sd, _ = read_state_dict(res.export)
    assert {v.dtype for v in sd.values() if v.ndim == 4} == {torch.float16}  # the kernels: nearly all the bytes
    assert {v.dtype for v in sd.values() if v.ndim < 4 and v.is_floating_point()} == {torch.float32}
    assert all(entries[f"tinyc-x{s}"]["storage"] == "float16" for s in (2, 3, 4))
    def fp32_psnr(weights: Path) -> float:
        net = load_model(weights=weights, scale=3, mode="fp32")
        return evaluate([root / "bench"], 3, net, ["fp32"], False, "paper", limit=1).results[0].psnr

    ev3 = json.loads((tmp_path / "run" / "eval" / "bench_x3.json").read_text())["results"]
    measured = next(r["psnr"] for r in ev3 if r["mode"] == "fp32")
    assert measured == fp32_psnr(res.export)  # the metrics are the stored file's ...
    assert measured != fp32_psnr(tmp_path / "run" / "pick" / "last.pt")  # ... not the float32 checkpoint's
    evaluated, _ = read_state_dict(tmp_path / "run" / "eval" / "stored.safetensors")
    assert evaluated.keys() == sd.keys() and all(torch.equal(evaluated[k], sd[k]) for k in sd)
    picked = load_model(weights=tmp_path / "run" / "pick" / "last.pt", scale=3, mode="fp32")
    own = picked.state_dict()
    assert any(not torch.equal(own[k], sd[k].float()) for k in sd if sd[k].ndim == 4)  # float16 rounded something
    assert all(torch.equal(own[k].half().float(), sd[k].float()) for k in sd if sd[k].ndim == 4)
    bad = text.replace("[[stages]]\nrun = \"cq2\"\nsteps = 12", "[[stages]]\nrun = \"cq2\"\nscales = [2, 4]\nsteps = 12")
    assert bad != text
    path.write_text(bad)
    with pytest.raises(SystemExit, match="must train the same scales"):
        load_recipe(path)


def test_a_budget_stop_then_resume_gives_the_same_export(root: Path, whole, tmp_path: Path) -> None:
    ref, _ = whole
    recipe = load_recipe(_write(root, "tiny"))
    results = [run_recipe(recipe, tmp_path, minutes=0.02, threads=1)]
    while not results[-1].finished and len(results) < 60:
        results.append(run_recipe(recipe, tmp_path, minutes=0.02, threads=1))
    assert not results[0].finished and "rerun" in results[0].message
    assert results[-1].finished, results[-1].message
    assert results[-1].sha256 == ref.sha256  # same machine, same recipe: the same bytes


def test_starting_from_the_backbone_file_gives_the_same_export(root: Path, whole, tmp_path: Path) -> None:
    ref, run_dir = whole
    from cadyq_cli.train.export import export_backbone
    from cadyq_cli.train.state import load_state

    entry = export_backbone(run_dir / "fp" / "last.pt", "tiny-fp", tmp_path)
    assert entry["arch"] == "edsr_baseline"  # the registered name, whatever alias trained it
    bb = tmp_path / entry["file"]
    a, b = load_state(run_dir / "fp" / "last.pt")["model"], load_state(bb)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    from cadyq_cli.models import create_model
    from cadyq_cli.train.prepare import warm_start

    assert warm_start(create_model("edsr_baseline", 2), str(bb)) == []  # --init FILE.safetensors for an fp stage too
    recipe = load_recipe(_write(root, "tiny_bb", start='start = "backbone"', backbone=f'backbone = "{bb}"'))
    res = run_recipe(recipe, tmp_path / "run", minutes=10, threads=1)
    assert res.finished and res.sha256 == ref.sha256
    assert not (tmp_path / "run" / "fp").exists()  # the backbone replaced the fp stage


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('name = "tiny-x2"', 'name = "tiny-x2'), "not valid TOML"),
    (lambda t: t.replace("steps = 6\nlr = 1e-3", "steps = 6\nlr = 1e-3\nbit_wieght = 1"), "unknown key 'bit_wieght'"),
    (lambda t: t.replace('init = "fp"', 'init = "fq"'), "init = 'fq' names no earlier run"),
    (lambda t: t.replace("stop_at = 4\nlr = 1e-4", 'stop_at = "4"\nlr = 1e-4'), "stop_at = '4' must be int"),
    (lambda t: t.replace('runs = ["cq", "cq2"]', 'runs = ["pams"]'), "runs must be cadyq runs"),
    (lambda t: t.replace("scale = 2\n", "scale = 5\n", 1), "scale must be 2, 3 or 4"),
    (lambda t: t.replace('stage = "pams"\ninit = "fp"', 'stage = "pams"'), "set init"),
    (lambda t: t.replace("max_gap = 100.0", ""), "missing 'max_gap'"),
    (lambda t: t.replace('arch = "edsr_baseline"', 'arch = "edsr_basline"'), "unknown architecture 'edsr_basline'"),
    (lambda t: t.replace('run = "fp"\nstage = "fp"', 'run = "fp"'), "missing 'stage'"),
    (lambda t: t.replace("steps = 6\nlr = 1e-3", "steps = 6\nlr = 1e-3\nema = 1.0"), "stage 1: ema must be a decay in [0, 1)"),
    (lambda t: t.replace("steps = 6\nlr = 1e-3", "steps = 6\nlr = 1e-3\nact_shift = 1"), "act_shift = 1 must be bool"),
    (lambda t: t.replace("steps = 6\nlr = 1e-3", "steps = 6\nlr = 1e-3\nbit_target = 9.0"),
     "bit_target is a FAB budget between 4 and 8 bits, not 9"),
    (lambda t: t.replace("seed = 0\n", "seed = 0\nbit_target = 4.5\n"),
     "stage 1: bit_target is a budget for the cadyq stage's bit loss"),
    (lambda t: t.replace("batch = 2\n", "batch = 0\n"), "stage 1: batch must be at least 1, not 0"),
    (lambda t: t.replace("steps = 6\nlr = 1e-3", 'steps = 6\nlr = 1e-3\nbit_target = "4.5"'),
     "bit_target = '4.5' must be int or float"),
    (lambda t: t.replace("steps = 6\nlr = 1e-3", 'steps = 6\nlr = 1e-3\nema = "0.9"'), "ema = '0.9' must be int or float"),
    (lambda t: t.replace("steps = 6\nlr = 1e-3", 'steps = 6\nlr = 1e-3\nwip = "w.safetensors"'), "unknown key 'wip'"),
    (lambda t: t.replace("steps = 6\nlr = 1e-3", "steps = 6\nlr = 1e-3\nscale_aug = 0.8"),
     "scale_aug = 0.8 must be a list of factors in (0, 1)"),
    (lambda t: t.replace("steps = 6\nlr = 1e-3", "steps = 6\nlr = 1e-3\nscale_aug = [0.8, 1.5]"),
     "stage 1: scale_aug takes distinct downscaling factors in (0, 1) (e.g. 0.9,0.8,0.7,0.6), not 0.8,1.5"),
    (lambda t: t.replace("steps = 6\nlr = 1e-3", 'steps = 6\nlr = 1e-3\nscale_aug = ["0.8"]'),
     "scale_aug = ['0.8'] must be a list"),
    (lambda t: t + '\n[export]\nstorage = "bfloat16"\n', "storage must be one of float32, float16, not 'bfloat16'"),
    (lambda t: t + '\n[export]\nstorage = [16]\n', "storage must be one of float32, float16, not [16]"),
])
def test_bad_recipes_are_refused_in_one_line(root: Path, tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(edit(TINY.format(root=root, start="", backbone="")))
    r = CliRunner().invoke(app, ["train", "--recipe", str(path), "--run-dir", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.output
    assert not (tmp_path / "run").exists()


def test_a_recipe_stage_may_set_ema(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "ema.toml"
    path.write_text(TINY.format(root=root, start="", backbone="").replace("steps = 6\nlr = 1e-3", "steps = 6\nlr = 1e-3\nema = 0.999"))
    assert [s.settings.get("ema") for s in load_recipe(path).segments][:2] == [0.999, None]


def test_a_recipe_stage_may_set_scale_aug(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "aug.toml"
    path.write_text(TINY.format(root=root, start="", backbone="").replace("steps = 6\nlr = 1e-3", "steps = 6\nlr = 1e-3\nscale_aug = [0.9, 0.7]"))
    assert [s.settings.get("scale_aug") for s in load_recipe(path).segments][:2] == [[0.9, 0.7], None]


def test_recipe_cli_refuses_a_stage_beside_it_and_an_edited_recipe(root: Path, tmp_path: Path, whole) -> None:
    _, run_dir = whole
    path = _write(root, "tiny")
    r = CliRunner().invoke(app, ["train", "fp", "--recipe", str(path)])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(app, ["train"])
    assert r.exit_code == 2 and "--recipe" in r.output
    r = CliRunner().invoke(app, ["train", "--recipe", str(path), "--steps", "5", "--init", "x.pt", "--threads", "1"])
    assert r.exit_code == 2 and "leave out" in r.output and "--init" in r.output and "--steps" in r.output  # not ignored
    assert not (tmp_path / "run").exists()
    edited = tmp_path / "tiny.toml"
    edited.write_text(path.read_text().replace("max_gap = 100.0", "max_gap = 99.0"))
    r = CliRunner().invoke(app, ["train", "--recipe", str(edited), "--run-dir", str(run_dir), "--threads", "1"])
    assert r.exit_code == 2 and "another recipe" in r.output


def _num(notes: str, flag: str) -> float | None:
    m = re.search(rf"{flag} ([0-9.]+)", notes)
    return float(m.group(1)) if m else None


@pytest.mark.parametrize("model", [w.name for w in list_weights()])
def test_every_shipped_model_has_a_recipe_that_agrees_with_the_manifest(model: str) -> None:
    w = {x.name: x for x in list_weights()}[model]
    assert w.recipe and (recipes_dir() / f"{w.recipe}.toml").is_file()
    r = load_recipe(w.recipe)
    assert (r.arch, r.export_name, r.storage, r.scales) == (w.arch, r.name, w.storage, w.scales)
    if r.scales:  # one multi-scale file (CARN): an entry NAME-xS per scale
        assert w.name == f"{r.name}-x{w.scale}" and w.scale in r.scales and w.file == f"{r.name}.safetensors"
    else:
        assert (r.name, r.scale) == (w.name, w.scale)
    assert r.backbone == (w.backbone or None)
    if r.start == "backbone":
        bb = list_backbones()[w.backbone]
        assert bb["scale"] == w.scale and bb["path"].is_file()
        fp = [s for s in r.segments if s.backbone][-1]
        assert fp.target == bb["steps"] and fp.settings["lr"] == bb["lr"] and fp.settings["scale"] == w.scale
    else:  # trained from scratch: the recipe's fp stages are the manifest's first stage records, in order
        fps = [s for s in r.segments if s.settings["stage"] == "fp"]
        runs = {s.run: s for s in fps}  # a run resumed by a later entry: its last settings
        records = [st for st in w.stages if st["stage"] == "fp"]
        assert w.stages[: len(records)] == records and len(records) == len(runs)
        for seg, rec in zip(runs.values(), records):
            assert seg.target == rec["steps"] and seg.settings["lr"] == rec["lr"]
    # pams and cadyq stages as the manifest records them (its last two stage records)
    pams, cadyq = w.stages[-2], w.stages[-1]
    ps = [s for s in r.segments if s.settings["stage"] == "pams"]
    assert len(ps) == 1 and ps[0].target == pams["steps"] and ps[0].settings["lr"] == pams["lr"]
    assert ps[0].settings.get("act_grid", "signed") == w.act_grid
    cs = [s for s in r.segments if s.settings["stage"] == "cadyq"]
    for key in ("lr", "batch", "selector_lr", "bit_ramp_steps"):
        assert {s.settings[key] for s in cs} == {cadyq[key]}, key
    assert {s.settings.get("skip", "official") for s in cs} == {w.skip}
    picked = [s for s in cs if s.run in r.pick["runs"]]
    assert picked[-1].settings["bit_weight_max"] == cadyq["bit_weight_max"]
    assert picked[-1].settings["steps"] >= cadyq["steps"]
    # the pick rule the notes quote
    assert _num(w.notes, "--max-gap") == r.pick["max_gap"]
    assert _num(w.notes, "--max-fab") == r.pick.get("max_fab")


@pytest.mark.parametrize("model", [w.name for w in list_weights() if w.backbone])
def test_shipped_backbones_equal_their_training_checkpoints(model: str) -> None:
    """Bit-identical to the fp checkpoint's model weights (where the run folder is still here)."""
    from cadyq_cli.train.state import load_state

    bb = list_backbones()[{x.name: x for x in list_weights()}[model].backbone]
    ckpt = Path(__file__).resolve().parents[1] / "runs" / bb["run"] / "last.pt"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is not in this checkout")
    a, b = load_state(ckpt)["model"], load_state(bb["path"])["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_a_shipped_recipe_starts_from_its_backbone_and_stops_at_the_budget(tmp_path: Path) -> None:
    """`cadyq train --recipe edsr-baseline-x2 --minutes M` (on a few generated images): the fp stages are
    replaced by the shipped backbone, pams starts from it, and the budget stops the run cleanly."""
    data = tmp_path / "hr"
    data.mkdir()
    rng = np.random.default_rng(5)
    for i in range(12):  # 10 are held out for validation, like the real split
        cv2.imwrite(str(data / f"im{i:02d}.png"), rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    run_dir = tmp_path / "run"
    args = ["train", "--recipe", "edsr-baseline-x2", "--minutes", "0.02", "--run-dir", str(run_dir), "--data", str(data),
            "--threads", "1", "--bf16", "off"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "starting from backbone edsr-baseline-x2-fp3" in r.output and "rerun the same command" in r.output
    recipe = load_recipe("edsr-baseline-x2")
    first = max(i for i, s in enumerate(recipe.segments) if s.backbone) + 1
    assert json.loads((run_dir / "recipe.json").read_text())["segments_done"] == first
    pams = recipe.segments[first]
    from cadyq_cli.train.state import load_state

    st = load_state(run_dir / pams.run / "last.pt")
    assert st["config"]["init"] == str(list_backbones()["edsr-baseline-x2-fp3"]["path"])
    assert 0 < st["step"] < pams.target and st["config"]["act_grid"] == "relu-unsigned"
    assert not (run_dir / "edsr_x2_fp5").exists() and not (run_dir / "export").exists()


def _committed_or_on_disk(root: Path, rel: str) -> bytes:
    """A weights file as the repository holds it at HEAD (a run may be rewriting it in this checkout right now),
    or as on disk where there is no commit of it."""
    import subprocess

    try:
        res = subprocess.run(["git", "-C", str(root), "cat-file", "blob", f"HEAD:./{rel}"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        res = None
    return res.stdout if res is not None and res.returncode == 0 else (root / rel).read_bytes()


def test_every_weights_file_is_in_the_manifest_once_with_its_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repository's weights/ holds what its manifest lists, no more: models (one file per entry, or one
    multi-scale file whose entries agree on it), backbones and runs in progress (``wip``, one file per run,
    replaced in place), each with the sha256 of the file and, for a run, the step it holds."""
    import hashlib

    root = Path(__file__).resolve().parents[1] / "weights"
    monkeypatch.setenv("CADYQ_WEIGHTS_DIR", str(root))
    manifest = json.loads((root / "manifest.json").read_text())
    by_file: dict[str, list[dict]] = {}
    for e in manifest["models"]:
        by_file.setdefault(e["file"], []).append(e)
    for file, entries in by_file.items():  # a shared file: one model at several scales, listed once per scale
        assert len({(e["sha256"], e["arch"]) for e in entries}) == 1, file
        if len(entries) > 1:
            assert all(sorted(e["scales"]) == sorted(x["scale"] for x in entries) for e in entries), file
    listed = list(by_file) + [b["file"] for b in manifest["backbones"]] + [w["file"] for w in manifest.get("wip", [])]
    on_disk = [p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")]
    assert sorted(listed) == sorted(on_disk)
    names = [e["name"] for e in manifest["models"] + manifest["backbones"] + manifest.get("wip", [])]
    assert len(names) == len(set(names))
    for entry in [es[0] for es in by_file.values()] + manifest["backbones"]:
        assert entry["sha256"] and file_sha256(root / entry["file"]) == entry["sha256"], entry["name"]
    assert set(list_wip()) == {w["name"] for w in manifest.get("wip", [])}
    for run in list_wip().values():
        assert run["file"].startswith("wip/") and run["path"] == root / run["file"]
        data = _committed_or_on_disk(root, run["file"])
        assert hashlib.sha256(data).hexdigest() == run["sha256"], f"{run['name']}: the manifest's wip entry is stale"
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len])["__metadata__"]  # the safetensors header's metadata
        assert (int(meta["step"]), int(meta["steps"]), meta["stage"]) == (run["step"], run["steps"], run["stage"])
        assert (root.parent / run["log"]).is_file(), run["log"]
