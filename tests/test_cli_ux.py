"""What a new user trips over (issue 17), each driven through the real ``cadyq`` command line.

Device strings, output paths refused before any work, default output names, stdin/stdout,
tile sizes that would change quantized outputs, ``eval --modes`` without ``--model``,
``--version`` and shell completion, help without ``<bool>``, ``cadyq models`` without torch,
the kernels line of the report and the ETA of the progress bar. Models: the tiny random x2
checkpoint of ``conftest.py``; images of a few tens of pixels.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner, Result

import cadyq_cli
from cadyq_cli import cli as cli_module
from cadyq_cli.cli import app
from cadyq_cli.devices import DeviceError
from cadyq_cli.engine import TilingConfig, upscale_array
from cadyq_cli.tiling import DEFAULT_SEAMLESS_TILE, seamless_core
from cadyq_cli.weights import load_model

ROOT = Path(__file__).resolve().parent.parent
MISSING_WEIGHTS = ["--weights", "/nonexistent/weights.safetensors", "--scale", "2"]  # loading these would fail


@pytest.fixture()
def cli(weights_x2: Path) -> Callable[..., Result]:
    """``cli(*args, model=True, stdin=None)``: run the app in-process with the x2 checkpoint."""
    runner = CliRunner()

    def run(*args: object, model: bool = True, stdin: bytes | None = None) -> Result:
        argv = [str(a) for a in args]
        if model:
            argv += ["--weights", str(weights_x2), "--scale", "2", "--threads", "1"]
        return runner.invoke(app, argv, input=stdin)

    return run


def _ok(res: Result) -> None:
    assert res.exit_code == 0, f"exit {res.exit_code}\nstdout: {res.stdout}\nstderr: {res.stderr}\n{res.exception!r}"


def _one_line_error(res: Result, code: int, *needles: str) -> str:
    """Asserts exit ``code`` and a single stderr line holding every needle, without a traceback."""
    assert res.exit_code == code, f"exit {res.exit_code}: {res.stderr}"
    assert "Traceback" not in res.stderr and (res.exception is None or isinstance(res.exception, SystemExit))
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def _size(path_or_bytes: Path | bytes) -> tuple[int, int]:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(src) as im:
        im.load()
        return im.size


# --------------------------------------------------------------------------- --device


@pytest.mark.parametrize("device", ["mps", "gpu", "cuda:0", "cuda:7"])
def test_bad_device_is_one_line_before_any_load(cli: Callable[..., Result], make_image: Callable[..., Path],
                                                tmp_path: Path, device: str) -> None:
    if device == "cuda:0" and torch.cuda.is_available():
        pytest.skip("CUDA is available here: cuda:0 is valid")
    src = make_image("in.png", 12, 10)
    res = cli("upscale", src, tmp_path / "out.png", "--device", device, *MISSING_WEIGHTS, model=False)
    line = _one_line_error(res, 2, f"--device {device}", "available here: cpu")
    assert "weights" not in line  # refused before the checkpoint is even opened
    assert not (tmp_path / "out.png").exists()
    with pytest.raises(DeviceError, match="available here"):  # the library says the same
        load_model(weights=MISSING_WEIGHTS[1], device=device)


def test_device_any_case_and_cuda_index(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("in.png", 12, 10)
    _ok(cli("upscale", src, tmp_path / "cpu.png", "--device", "CPU", "-q"))
    assert _size(tmp_path / "cpu.png") == (24, 20)
    if torch.cuda.is_available():
        _ok(cli("upscale", src, tmp_path / "cuda.png", "--device", "cuda:0", "-q"))
        assert _size(tmp_path / "cuda.png") == (24, 20)


# --------------------------------------------------------------------------- output paths, before any work


@pytest.mark.parametrize("name", ["out.gif", "out", "out.PNG.txt"])
def test_unwritable_output_name_refused_before_work(cli: Callable[..., Result], make_image: Callable[..., Path],
                                                    tmp_path: Path, name: str) -> None:
    src = make_image("in.png", 12, 10)
    res = cli("upscale", src, tmp_path / name, *MISSING_WEIGHTS, model=False)
    _one_line_error(res, 2, name, "png, jpg", "webp", "tif", "bmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_trailing_slash_or_existing_folder_is_a_folder(cli: Callable[..., Result], make_image: Callable[..., Path],
                                                       tmp_path: Path) -> None:
    src = make_image("in.jpg", 12, 10)
    _ok(cli("upscale", src, f"{tmp_path / 'newdir'}/", "-q"))
    assert _size(tmp_path / "newdir" / "in_x2.png") == (24, 20)
    (tmp_path / "there").mkdir()
    _ok(cli("upscale", src, tmp_path / "there", "--ext", "webp", "-q"))
    assert [p.name for p in (tmp_path / "there").iterdir()] == ["in_x2.webp"]


def test_folder_input_with_an_image_name_refused(cli: Callable[..., Result], make_image: Callable[..., Path],
                                                 tmp_path: Path) -> None:
    make_image("a.png", 12, 10, folder=tmp_path / "in")
    res = cli("upscale", tmp_path / "in", tmp_path / "out.png", *MISSING_WEIGHTS, model=False)
    _one_line_error(res, 2, "out.png", "must be a folder")
    res = cli("upscale", tmp_path / "in", "-", *MISSING_WEIGHTS, model=False)
    _one_line_error(res, 2, "single image")
    assert not (tmp_path / "out.png").exists()


def test_default_output_name_never_overwrites(cli: Callable[..., Result], make_image: Callable[..., Path],
                                              tmp_path: Path) -> None:
    src = make_image("photo.jpg", 12, 10)
    _ok(cli("upscale", src, "-q"))
    out = tmp_path / "photo_x2.png"
    assert _size(out) == (24, 20)
    out.write_bytes(b"precious")
    res = cli("upscale", src, *MISSING_WEIGHTS, model=False)  # refused before the model loads
    _one_line_error(res, 1, "photo_x2.png", "exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    _ok(cli("upscale", src, "--overwrite", "-q"))
    assert _size(out) == (24, 20)
    # a folder input goes to the sibling folder <dir>_x<scale>
    make_image("a.png", 12, 10, folder=tmp_path / "album")
    _ok(cli("upscale", tmp_path / "album", "-q"))
    assert _size(tmp_path / "album_x2" / "a.png") == (24, 20)


# --------------------------------------------------------------------------- stdin / stdout


def test_stdin_and_stdout(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("in.png", 12, 10)
    _ok(cli("upscale", src, tmp_path / "ref.png", "-q"))
    ref = (tmp_path / "ref.png").read_bytes()

    _ok(cli("upscale", "-", tmp_path / "from_stdin.png", "-q", stdin=src.read_bytes()))
    assert (tmp_path / "from_stdin.png").read_bytes() == ref

    res = cli("upscale", src, "-", "--json", "-")  # report and JSON on stderr, only the image on stdout
    _ok(res)
    assert res.stdout_bytes == ref
    rec = json.loads(next(ln for ln in res.stderr.splitlines() if ln.startswith("{")))
    assert rec["output"] == "-" and rec["width"] == 12

    res = cli("upscale", "-", "-", "--ext", "jpg", "-q", stdin=src.read_bytes())
    _ok(res)
    assert res.stdout_bytes[:3] == b"\xff\xd8\xff" and _size(res.stdout_bytes) == (24, 20)

    res = cli("upscale", "-", model=False)
    _one_line_error(res, 2, "stdin", "needs an output")
    res = cli("upscale", "-", tmp_path / "x.png", "-q", stdin=b"not an image")
    assert res.exit_code == 1 and "cannot read -" in res.stderr and not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- --tile


def test_tile_that_changes_quantized_output_is_refused(cli: Callable[..., Result], make_image: Callable[..., Path],
                                                       tmp_path: Path, load_x2: Callable[[str], object]) -> None:
    src = make_image("in.png", 12, 10)
    for mode in ("dynamic", "w8a4"):
        res = cli("upscale", src, tmp_path / "o.png", "--tile", "64", "--mode", mode, *MISSING_WEIGHTS, model=False)
        _one_line_error(res, 2, "--tile 64", "384..479", "--tiling paper")
    assert not (tmp_path / "o.png").exists()
    for i, extra in enumerate((["--tile", "479"], ["--tile", "64", "--mode", "fp32"], ["--tile", "40", "--tiling", "paper"],
                               ["--tile", "391", "--region", "8"])):
        _ok(cli("upscale", src, tmp_path / f"ok{i}.png", "-q", *extra))
    rgb = np.zeros((10, 12, 3), np.float32)
    with pytest.raises(ValueError, match="--tile 64"):  # the library refuses the same
        upscale_array(load_x2("dynamic"), rgb, TilingConfig(tile=64))  # type: ignore[arg-type]
    upscale_array(load_x2("dynamic"), rgb, TilingConfig(tile=64, any_tile=True))  # type: ignore[arg-type]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 24), dw=st.integers(-4, 24), region=st.integers(4, 32), pick=st.integers(0, 31),
       mode=st.sampled_from(["dynamic", "w8a8"]), seed=st.integers(0, 3))
def test_accepted_tiles_give_identical_quantized_output(pattern: Callable[..., np.ndarray],
                                                        small_model: Callable[[str], object], h: int, dw: int,
                                                        region: int, pick: int, mode: str, seed: int) -> None:
    core = seamless_core(None, region)
    accepted = [t for t in range(core, core + region) if t != DEFAULT_SEAMLESS_TILE]  # same core as the default
    tile = accepted[pick % len(accepted)]
    assert seamless_core(tile, region) == core
    net = small_model(mode)
    w = core + 2 * net.receptive_radius + dw  # type: ignore[attr-defined]  # around the one-tile limit
    rgb = pattern(w, h, seed=seed).astype(np.float32)
    ref, rep_ref = upscale_array(net, rgb, TilingConfig(region=region), out_dtype="uint8")  # type: ignore[arg-type]
    out, rep = upscale_array(net, rgb, TilingConfig(tile=tile, region=region), out_dtype="uint8")  # type: ignore[arg-type]
    assert np.array_equal(out, ref) and rep.regions == rep_ref.regions
    with pytest.raises(ValueError, match="--tile"):
        upscale_array(net, rgb, TilingConfig(tile=core + region, region=region))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- eval, version, help, models


@pytest.fixture()
def shipped(monkeypatch: pytest.MonkeyPatch, weights_x2: Path, tmp_path: Path) -> Path:
    """A weights folder whose manifest ships the x2 checkpoint as the default model."""
    wdir = tmp_path / "weights"
    wdir.mkdir()
    shutil.copy(weights_x2, wdir / "edsr_x2.safetensors")
    entry = {"name": "edsr-baseline-x2", "file": "edsr_x2.safetensors", "arch": "edsr_baseline", "scale": 2,
             "sha256": "", "params": 1_376_427,
             "metrics": {"Set5": {"fp32": {"psnr": 37.5}, "dynamic": {"psnr": 37.4, "fab": 5.5}}}}
    (wdir / "manifest.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("CADYQ_WEIGHTS_DIR", str(wdir))
    return wdir


def test_eval_modes_without_model_uses_the_default_model(shipped: Path, make_image: Callable[..., Path],
                                                         tmp_path: Path) -> None:
    make_image("a.png", 24, 24, folder=tmp_path / "set")
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tmp_path / "set"), "--modes", "w8a8", "--bicubic", "--scale", "2",
                              "--json", "-", "-q", "--threads", "1"])
    _ok(res)
    out = json.loads(res.stdout)
    assert out["model"] == "edsr-baseline-x2"
    assert sorted(r["mode"] for r in out["results"]) == ["bicubic", "w8a8"]
    res = runner.invoke(app, ["eval", str(tmp_path / "set"), "--bicubic", "--scale", "2", "--json", "-", "-q"])
    _ok(res)
    assert [r["mode"] for r in json.loads(res.stdout)["results"]] == ["bicubic"]  # --bicubic alone: no model


def test_version_and_completion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the shell is named on the command line, not detected from the process running the tests (sh, zsh, ...)
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    runner = CliRunner()
    res = runner.invoke(app, ["--version"])
    _ok(res)
    assert res.stdout.strip() == f"cadyq {cadyq_cli.__version__}"
    res = runner.invoke(app, ["--show-completion", "bash"])
    _ok(res)
    assert "complete" in res.stdout
    res = runner.invoke(app, ["--install-completion", "bash"], env={"HOME": str(tmp_path), "SHELL": "/bin/bash"})
    _ok(res)
    assert (tmp_path / ".bashrc").is_file()


@pytest.mark.parametrize("argv", [["--help"], ["upscale", "--help"], ["eval", "--help"], ["bitmap", "--help"]])
def test_help_shows_flags_without_a_value(argv: list[str]) -> None:
    res = CliRunner().invoke(app, argv, env={"COLUMNS": "120"})
    _ok(res)
    assert "<bool>" not in res.stdout and "--help" in res.stdout
    if argv[0] == "upscale":
        line = next(ln for ln in res.stdout.splitlines() if "--overwrite" in ln)
        assert "replace existing outputs" in line


def test_models_lists_without_torch_at_80_columns(shipped: Path) -> None:
    code = ("import sys\nfrom cadyq_cli.cli import app\ntry:\n    app(['models'])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", "CADYQ_WEIGHTS_DIR": str(shipped)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines()[-1] == "no torch"
    rows = res.stdout.splitlines()
    assert all(len(r) <= 80 for r in rows) and "…" not in res.stdout
    row = next(r for r in rows if "edsr-baseline-x2" in r)
    assert row.split()[:3] == ["edsr-baseline-x2", "edsr_baseline", "x2"] and "5.50" in row


# --------------------------------------------------------------------------- report and progress


def test_report_names_the_kernels(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("in.png", 12, 10)
    for kernels in ("float", "auto"):
        res = cli("upscale", src, tmp_path / f"{kernels}.png", "--kernels", kernels, "--json", "-")
        _ok(res)
        ran = json.loads(res.stdout)["kernels"]
        line = next(ln for ln in res.stderr.splitlines() if ln.startswith("kernels"))
        assert line.split()[1] == ran


def test_progress_shows_an_eta(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_module, "err", Console(stderr=True, force_terminal=True, width=120))
    src = make_image("in.png", 12, 10)
    res = cli("upscale", src, tmp_path / "o.png")
    _ok(res)
    assert "eta" in res.stderr
    res = cli("upscale", src, tmp_path / "q.png", "--quiet")
    _ok(res)
    assert res.stderr == ""


def test_folder_gif_becomes_png_and_colliding_outputs_are_refused(tmp_path: Path) -> None:
    from cadyq_cli.errors import CadyqError
    from cadyq_cli.paths import plan_jobs

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.gif", "b.jpg", "b.png"):
        (src / name).write_bytes(b"x")
    jobs = plan_jobs(src, tmp_path / "out", scale=2)
    assert sorted(j.dst.name for j in jobs) == ["a.png", "b.jpg", "b.png"]
    with pytest.raises(CadyqError, match="would both be written"):
        plan_jobs(src, tmp_path / "out", ext="png", scale=2)


def test_int8_dot_product_check_obeys_the_isa_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from cadyq_cli.devices import cpu_has_int8_dot

    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "CADYQ_INT8"):
        monkeypatch.delenv(var, raising=False)
    here = cpu_has_int8_dot()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert cpu_has_int8_dot() == here  # a cap that keeps VNNI changes nothing
    for cap in ("AVX2", "avx512_core", "SSE41"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert not cpu_has_int8_dot()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("CADYQ_INT8", "0")
    assert not cpu_has_int8_dot()


def test_bf16_check_obeys_the_isa_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from cadyq_cli.devices import cpu_has_bf16

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # VNNI but no bf16
    assert not cpu_has_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_bf16()


def test_isa_caps_allow_only_their_own_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    from cadyq_cli import devices

    monkeypatch.delenv("CADYQ_INT8", raising=False)
    monkeypatch.setattr(devices, "_cpu_flags", lambda: "fpu avx2 avx512f avx512_vnni")  # a Cascade Lake
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2_VNNI")  # VEX VNNI only, which this CPU lacks
    assert not devices.cpu_has_int8_dot()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")
    assert devices.cpu_has_int8_dot()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert devices.cpu_has_int8_dot() and not devices.cpu_has_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert devices.cpu_has_int8_dot()
