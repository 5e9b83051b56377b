"""The ``cadyq`` command line, driven for real: files, folders, formats, errors, signals.

Most tests call ``cadyq_cli.cli.app`` in-process through typer's ``CliRunner`` (stdout and
stderr are captured separately); the signal tests run the installed console script. Every
model is the tiny random-weight x2 checkpoint of ``conftest.py``, on one thread.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from typer.testing import CliRunner, Result

from cadyq_cli.cli import app
from cadyq_cli.engine import TilingConfig, upscale_array
from cadyq_cli.io import read_image
from conftest import _error_line, _lose_a_signal, _ok, _open, _tmp_files


CADYQ = Path(sys.executable).with_name("cadyq")
N_SEL = 32
JSON_KEYS = {"input", "output", "scale", "model", "mode", "fab", "bits_histogram", "bitops_g", "bitops_fp32_g",
             "seconds", "regions"}


# --------------------------------------------------------------------------- file -> file, JSON


def test_file_to_file_json_stdout(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("in.png", 40, 30)
    dst = tmp_path / "out.png"
    res = cli("upscale", src, dst, "--region", "16", "--json", "-")
    _ok(res)
    assert _open(dst).size == (80, 60)
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and res.stdout.endswith("\n")
    rec = json.loads(lines[0])
    assert JSON_KEYS <= set(rec)
    assert rec["input"] == str(src) and rec["output"] == str(dst)
    assert rec["scale"] == 2 and rec["mode"] == "dynamic" and isinstance(rec["model"], str)
    assert set(rec["bits_histogram"]) == {"4", "6", "8"}
    assert 4.0 <= rec["fab"] <= 8.0
    assert 0 < rec["bitops_g"] < rec["bitops_fp32_g"] and rec["seconds"] >= 0
    regions = rec["regions"]
    assert len(regions) == 3 * 2  # 40x30 in 16 px regions
    cover = np.zeros((30, 40), int)
    for r in regions:
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 30
        cover[y0:y1, x0:x1] += 1
        assert len(r["bits"]) == N_SEL and set(r["bits"]) <= {4, 6, 8}
        assert all(isinstance(b, int) for b in r["bits"])
        assert r["fab"] == pytest.approx(sum(r["bits"]) / N_SEL, abs=1e-3)
    assert (cover == 1).all(), "regions must tile the image exactly"
    assert sum(rec["bits_histogram"].values()) == N_SEL * len(regions)
    assert sum(1 for v in rec["bits_histogram"].values() if v) >= 2, "random selectors should mix bit widths"
    assert res.stderr.strip(), "the report goes to stderr"


def test_json_to_file_and_one_line_per_image(cli: Callable[..., Result], make_image: Callable[..., Path],
                                             tmp_path: Path) -> None:
    for i in range(3):
        make_image(f"img{i}.png", 12, 10, seed=i, folder=tmp_path / "in")
    log = tmp_path / "log.jsonl"
    res = cli("upscale", tmp_path / "in", tmp_path / "out", "--json", log, "--quiet")
    _ok(res)
    assert res.stdout == "" and res.stderr == ""
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [Path(r["input"]).name for r in recs] == ["img0.png", "img1.png", "img2.png"]
    res = cli("upscale", tmp_path / "in", tmp_path / "out3", "--json", tmp_path / "nodir" / "log.jsonl")
    assert res.exit_code == 2
    _error_line(res, "--json", "nodir")
    res = cli("upscale", tmp_path / "in", tmp_path / "out2", "--json", "-", "--quiet")
    _ok(res)
    assert [json.loads(ln)["output"] for ln in res.stdout.splitlines()] == [
        str(tmp_path / "out2" / f"img{i}.png") for i in range(3)]


# --------------------------------------------------------------------------- folders


def test_folder_to_folder(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = tmp_path / "in"
    make_image("a.png", 12, 10, folder=src)
    make_image("b.jpg", 14, 10, folder=src, quality=95)
    make_image("c.webp", 10, 12, folder=src / "sub")
    (src / "notes.txt").write_text("not an image")

    res = cli("upscale", src, tmp_path / "flat", "-q")
    _ok(res)
    assert sorted(p.name for p in (tmp_path / "flat").rglob("*")) == ["a.png", "b.jpg"]
    assert _open(tmp_path / "flat" / "b.jpg").size == (28, 20)

    res = cli("upscale", src, tmp_path / "deep", "--recursive", "--suffix", "_x2", "--ext", "jpg", "-q")
    _ok(res)
    got = sorted(str(p.relative_to(tmp_path / "deep")) for p in (tmp_path / "deep").rglob("*") if p.is_file())
    assert got == ["a_x2.jpg", "b_x2.jpg", os.path.join("sub", "c_x2.jpg")]
    im = _open(tmp_path / "deep" / "sub" / "c_x2.jpg")
    assert im.format == "JPEG" and im.size == (20, 24)


def test_folder_with_bad_files(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = tmp_path / "in"
    good = make_image("good.png", 16, 12, folder=src)
    make_image("z_good[b].png", 12, 12, seed=3, folder=src)  # brackets: not rich markup
    (src / "empty.png").write_bytes(b"")
    data = good.read_bytes()
    (src / "half.png").write_bytes(data[: len(data) // 2])
    (src / "text[red].jpg").write_text("hello, I am not a JPEG\n")
    out = tmp_path / "out"
    res = cli("upscale", src, out)
    assert res.exit_code == 1, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.png", "z_good[b].png"]
    for name in ("empty.png", "half.png", "text[red].jpg"):
        _error_line(res, name, "cannot read")
    assert "truncated" in _error_line(res, "half.png")
    assert not _tmp_files(out)


# --------------------------------------------------------------------------- formats


def test_rgba_keeps_upscaled_alpha(pattern: Callable[..., np.ndarray], cli: Callable[..., Result], tmp_path: Path) -> None:
    rgb = pattern(20, 16)
    alpha = np.tile(np.linspace(0, 255, 20).round().astype(np.uint8), (16, 1))
    src = tmp_path / "in.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src)
    _ok(cli("upscale", src, tmp_path / "out.png", "-q"))
    out = _open(tmp_path / "out.png")
    assert out.mode == "RGBA" and out.size == (40, 32)
    a = np.asarray(out)[:, :, 3].astype(float)
    assert np.abs(a - np.kron(alpha.astype(float), np.ones((2, 2)))).mean() < 6
    assert a.min() <= 5 and a.max() >= 250


def test_palette_with_transparency_gives_rgba(pattern: Callable[..., np.ndarray], cli: Callable[..., Result], tmp_path: Path) -> None:
    im = Image.fromarray(pattern(16, 12), "RGB").quantize(8)
    idx = np.asarray(im)
    src = tmp_path / "pal.png"
    im.save(src, transparency=int(idx[0, 0]))
    _ok(cli("upscale", src, tmp_path / "out.png", "-q"))
    out = _open(tmp_path / "out.png")
    assert out.mode == "RGBA" and out.size == (32, 24)
    a = np.asarray(out)[:, :, 3]
    assert a.min() < 128 and a.max() == 255


def test_grayscale_stays_grayscale(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("g.png", 15, 11, mode="L")
    _ok(cli("upscale", src, tmp_path / "out.png", "-q"))
    out = _open(tmp_path / "out.png")
    assert out.mode == "L" and out.size == (30, 22)


def test_16bit_png_stays_16bit(pattern: Callable[..., np.ndarray], cli: Callable[..., Result], load_x2: Callable[[str], object], tmp_path: Path) -> None:
    arr = pattern(14, 10, dtype=np.uint16)
    src = tmp_path / "deep.png"
    assert cv2.imwrite(str(src), arr[:, :, ::-1])
    _ok(cli("upscale", src, tmp_path / "out.png", "-q"))
    out = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (20, 28, 3)
    out = out[:, :, ::-1]
    # the file holds the float result at 16-bit precision: round(sr * 257), not 8-bit values
    img = read_image(src)
    assert img.bit_depth == 16
    sr, _ = upscale_array(load_x2("dynamic"), img.rgb, TilingConfig())  # type: ignore[arg-type]
    expected = np.rint(np.clip(sr * 257.0, 0, 65535)).astype(np.int64)
    assert np.abs(out.astype(np.int64) - expected).max() <= 1
    assert (out % 257 != 0).mean() > 0.5


def test_exif_orientation_applied(pattern: Callable[..., np.ndarray], cli: Callable[..., Result], tmp_path: Path) -> None:
    im = Image.fromarray(pattern(24, 16), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    src = tmp_path / "rot.jpg"
    im.save(src, exif=exif, quality=95)
    _ok(cli("upscale", src, tmp_path / "out.jpg", "-q"))
    out = _open(tmp_path / "out.jpg")
    assert out.size == (32, 48)  # displayed 16x24, upscaled x2
    assert out.getexif().get(0x0112, 1) == 1


def test_icc_profile_carried(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = make_image("icc.png", 12, 10, icc_profile=icc)
    _ok(cli("upscale", src, tmp_path / "out.png", "-q"))
    assert _open(tmp_path / "out.png").info.get("icc_profile") == icc


def test_cmyk_jpeg(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("cmyk.jpg", 16, 12, mode="CMYK", quality=95)
    assert _open(src).mode == "CMYK"
    _ok(cli("upscale", src, tmp_path / "out.png", "-q"))
    out = _open(tmp_path / "out.png")
    assert out.mode == "RGB" and out.size == (32, 24)


@pytest.mark.parametrize(("w", "h"), [(1, 1), (2, 3), (300, 2)])
def test_tiny_and_strip_images(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path,
                               w: int, h: int) -> None:
    src = make_image("in.png", w, h)
    res = cli("upscale", src, tmp_path / "out.png", "--json", "-")
    _ok(res)
    assert _open(tmp_path / "out.png").size == (2 * w, 2 * h)
    rec = json.loads(res.stdout)
    assert sum((r["box"][2] - r["box"][0]) * (r["box"][3] - r["box"][1]) for r in rec["regions"]) == w * h


# --------------------------------------------------------------------------- existing outputs, bad paths


def test_overwrite_refusal_and_skip(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("in.png", 12, 10)
    dst = tmp_path / "out.png"
    dst.write_bytes(b"precious")
    res = cli("upscale", src, dst)
    assert res.exit_code == 1
    _error_line(res, str(dst), "exists")
    assert dst.read_bytes() == b"precious"

    res = cli("upscale", src, dst, "--skip-existing")
    _ok(res)
    assert dst.read_bytes() == b"precious" and "1 skipped" in res.stderr

    _ok(cli("upscale", src, dst, "--overwrite", "-q"))
    assert _open(dst).size == (24, 20)
    assert not _tmp_files(tmp_path)


def test_input_never_overwritten(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("in.png", 12, 10)
    before = src.read_bytes()
    res = cli("upscale", src, src, "--overwrite")
    assert res.exit_code == 1
    _error_line(res, "refusing to overwrite the input")
    # the same file through another spelling of its path
    res = cli("upscale", src, tmp_path / "." / "in.png", "--overwrite")
    assert res.exit_code == 1
    assert src.read_bytes() == before


def test_output_inside_a_file(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("in.png", 12, 10)
    blocker = tmp_path / "plain.txt"
    blocker.write_text("I am a file")
    res = cli("upscale", src, blocker / "out.png")
    assert res.exit_code in (1, 2)
    _error_line(res, "plain.txt", "not a directory")
    assert blocker.read_text() == "I am a file"
    # a folder job whose output folder would have to live inside that file
    res = cli("upscale", src.parent, blocker / "out", "-q")
    assert res.exit_code == 2
    _error_line(res, "plain.txt", "not a directory")
    assert blocker.read_text() == "I am a file"


def test_unknown_output_extension(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("in.png", 12, 10)
    res = cli("upscale", src, tmp_path / "out.xyz")
    assert res.exit_code in (1, 2)
    _error_line(res, "unknown extension")
    assert not (tmp_path / "out.xyz").exists()
    res = cli("upscale", src, tmp_path / "o.png", "--ext", "xyz")
    assert res.exit_code == 2
    _error_line(res, "--ext xyz")


@pytest.mark.parametrize("extra", [["--mode", "bogus"], ["--overwrite", "--skip-existing"], ["--tiling", "nope"],
                                   ["--region", "0"], ["--tile", "abc"]])
def test_usage_errors_exit_2(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path,
                             extra: list[str]) -> None:
    src = make_image("in.png", 12, 10)
    res = cli("upscale", src, tmp_path / "out.png", *extra)
    assert res.exit_code == 2, res.stderr
    assert res.stdout == "" and res.stderr.strip()
    assert not (tmp_path / "out.png").exists()


def test_missing_input_exit_2(cli: Callable[..., Result], tmp_path: Path) -> None:
    res = cli("upscale", tmp_path / "nothing.png", tmp_path / "out.png")
    assert res.exit_code == 2
    _error_line(res, "nothing.png", "no such file")
    res = cli("upscale", model=False)
    assert res.exit_code == 2


# --------------------------------------------------------------------------- determinism, limits


def test_deterministic_output(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("in.png", 40, 30)
    for name in ("a.png", "b.png"):
        _ok(cli("upscale", src, tmp_path / name, "--region", "16", "-q"))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_png_level_option(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    """``--png-level`` changes only the zlib effort of upscale and bitmap outputs; out of 0-9 is a usage error."""
    src = make_image("in.png", 40, 30)
    for cmd in ("upscale", "bitmap"):
        _ok(cli(cmd, src, tmp_path / f"{cmd}0.png", "--region", "16", "--png-level", "0", "-q"))
        _ok(cli(cmd, src, tmp_path / f"{cmd}9.png", "--region", "16", "--png-level", "9", "-q"))
        small, big = (tmp_path / f"{cmd}9.png"), (tmp_path / f"{cmd}0.png")
        assert small.stat().st_size < big.stat().st_size
        assert np.array_equal(read_image(small).rgb, read_image(big).rgb)
        res = cli(cmd, src, tmp_path / f"{cmd}x.png", "--png-level", "10", "-q")
        assert res.exit_code == 2 and not (tmp_path / f"{cmd}x.png").exists()
    from cadyq_cli import cli as cli_module
    from cadyq_cli.batch import upscale_jobs
    from cadyq_cli.io import PNG_LEVEL

    assert f"default {PNG_LEVEL}" in cli_module.PngLevelOpt.__metadata__[0].help
    with pytest.raises(ValueError, match="png_level"):  # refused before any job, not once per image
        upscale_jobs(None, [], TilingConfig(), png_level=12)  # type: ignore[arg-type]


def test_threads_do_not_change_output(cli: Callable[..., Result], make_image: Callable[..., Path],
                                      weights_x2: Path, tmp_path: Path) -> None:
    src = make_image("in.png", 20, 16)
    runner = CliRunner()
    outs = []
    try:
        for n in (1, 2):
            dst = tmp_path / f"t{n}.png"
            res = runner.invoke(app, ["upscale", str(src), str(dst), "--weights", str(weights_x2), "--scale", "2",
                                      "--threads", str(n), "--region", "16", "--json", "-", "-q"])
            _ok(res)
            outs.append((dst.read_bytes(), json.loads(res.stdout)["regions"]))
    finally:
        torch.set_num_threads(1)
    assert outs[0][1] == outs[1][1], "bit choices differ between 1 and 2 threads"
    assert outs[0][0] == outs[1][0], "pixels differ between 1 and 2 threads"


def test_decompression_bomb_refused(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("big.png", 20, 20)
    res = cli("upscale", src, tmp_path / "out.png", "--max-pixels", "100")
    assert res.exit_code == 1
    line = _error_line(res, "big.png", "400")
    assert "limit" in line
    assert not (tmp_path / "out.png").exists()


# --------------------------------------------------------------------------- signals (installed script)


def _wait_first_output(proc: subprocess.Popen, out: Path, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"cadyq ended early with {proc.returncode}: {proc.communicate()}")
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            return
        time.sleep(0.02)
    raise AssertionError("no output appeared")


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_a_lost_signal_stops_the_folder_job_after_reporting_its_image(make_image: Callable[..., Path], cli: Callable[..., Result],
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signal's raise can be dropped by the interpreter (it landed in a garbage-collector callback on CI):
    the job still ends 143 after the image it was on, that image reported, the rest left for a rerun."""
    import cadyq_cli.pipeline as pipeline

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        make_image(name, 24, 20, folder=src)
    real = pipeline.upscale_file

    def upscale_then_lose_a_signal(*args: object, **kw: object) -> object:
        res = real(*args, **kw)
        _lose_a_signal(signal.SIGTERM)
        return res

    monkeypatch.setattr(pipeline, "upscale_file", upscale_then_lose_a_signal)
    res = cli("upscale", src, tmp_path / "out", "--json", tmp_path / "log.jsonl")
    assert res.exit_code == 143 and "interrupted" in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
    assert [Path(json.loads(ln)["output"]).name for ln in (tmp_path / "log.jsonl").read_text().splitlines()] == ["a.png"]


@pytest.mark.skipif(not CADYQ.exists() or os.name != "posix", reason="needs the installed console script on POSIX")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_folder_job(pattern: Callable[..., np.ndarray], cli: Callable[..., Result], weights_x2: Path, tmp_path: Path,
                                  sig: signal.Signals, code: int) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    # Images large enough that the batch lasts seconds: at 24x20 a fast machine finished all of them (0.3 s)
    # before the signal arrived, and the job ended 0.
    n = 24
    for i in range(n):
        Image.fromarray(pattern(96, 80, seed=i), "RGB").save(src / f"img{i:02d}.png")
    proc = subprocess.Popen(
        [str(CADYQ), "upscale", str(src), str(out), "--weights", str(weights_x2), "--scale", "2", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_first_output(proc, out)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert stdout == ""
    done = sorted(p for p in out.iterdir())
    assert not _tmp_files(out), done
    assert 0 < len(done) < n, "the signal should arrive mid-batch"
    for p in done:
        assert _open(p).size == (192, 160)
    stamps = {p.name: p.stat().st_mtime_ns for p in done}

    res = cli("upscale", src, out, "--skip-existing", "-q")
    _ok(res)
    assert len(list(out.iterdir())) == n and not _tmp_files(out)
    assert all((out / name).stat().st_mtime_ns == t for name, t in stamps.items())


@pytest.mark.skipif(not CADYQ.exists() or os.name != "posix", reason="needs the installed console script on POSIX")
def test_console_script_ends_with_every_byte_out(pattern: Callable[..., np.ndarray], weights_x2: Path,
                                                 tmp_path: Path) -> None:
    """The installed command ends without the interpreter's teardown after upscale/bitmap (cli.main): its exit
    code is the command's, and what it wrote to stdout, the JSON file and the outputs is all there."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(2):
        Image.fromarray(pattern(24, 20, seed=i), "RGB").save(src / f"img{i}.png")
    (src / "bad.png").write_bytes(b"not an image")
    common = ["--weights", str(weights_x2), "--scale", "2", "--threads", "1"]
    res = subprocess.run([str(CADYQ), "upscale", str(src), str(out), "--json", str(tmp_path / "j.jsonl"), *common],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "bad.png" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "2 upscaled, 0 skipped, 1 failed" in res.stderr
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png"]
    res = subprocess.run([str(CADYQ), "upscale", str(src / "img0.png"), "-", "--json", "-", *common],
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == (out / "img0.png").read_bytes()
    records = [json.loads(line) for line in res.stderr.decode().splitlines() if line.startswith("{")]
    assert [r["output"] for r in records] == ["-"]
    res = subprocess.run([str(CADYQ), "bitmap", str(src / "img1.png"), str(tmp_path / "map.png"), *common],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "FAB" in res.stderr, res.stderr
    assert _open(tmp_path / "map.png").width >= 24  # fully written (a truncated PNG does not decode)


@pytest.mark.parametrize("fn", ["entry", "main"])
def test_only_the_program_skips_teardown(make_image: Callable[..., Path], weights_x2: Path, tmp_path: Path,
                                         fn: str) -> None:
    """``cli.entry`` (the installed ``cadyq``, ``python -m cadyq_cli``) ends the process after a command that
    loaded a model without running exit handlers, with the command's exit code (here 2: a usage error found
    after the load); ``cli.main`` raises SystemExit to its caller as before, whose own handlers run."""
    src = make_image("in.png", 24, 20)
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('TEARDOWN', flush=True))\n"
        f"sys.argv = ['cadyq', 'bitmap', {str(src)!r}, {str(tmp_path / 'm.png')!r}, '--weights', {str(weights_x2)!r},"
        " '--scale', '2', '--layer', '99', '--threads', '1']\n"
        "from cadyq_cli import cli\n"
        f"try:\n    cli.{fn}()\nexcept SystemExit as e:\n    print('CAUGHT', e.code, flush=True)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == (2 if fn == "entry" else 0), res.stderr
    assert "--layer must be between" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout.split() == ([] if fn == "entry" else ["CAUGHT", "2", "TEARDOWN"])
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("command", ["upscale", "models"])
def test_the_program_starts_lean(tmp_path: Path, command: str) -> None:
    """For upscale/bitmap the program keeps numpy's OpenBLAS to one thread unless the environment set it, and
    imports OpenVINO without its model-conversion package, which stays importable afterwards; other commands
    are left alone."""
    code = (
        "import os, sys\n"
        f"sys.argv = ['cadyq', {command!r}, 'in.png']\n"
        "from cadyq_cli import program\n"
        "program._quiet_blas(sys.argv)\n"
        "program._import_openvino_lean()\n"
        "import openvino\n"
        "print(os.environ.get('OPENBLAS_NUM_THREADS'), hasattr(openvino, 'convert_model'))\n"
        "import openvino.tools.ovc as ovc\n"
        "print(callable(ovc.convert_model))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    blas = "1" if command == "upscale" else "None"
    assert res.stdout.split() == [blas, "False", "True"]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "OPENBLAS_NUM_THREADS": "2"})
    assert res.stdout.split()[0] == "2"  # the user's setting wins


def test_in_process_runs_keep_no_model(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    from cadyq_cli import cli as cli_module

    _ok(cli("upscale", make_image("in.png", 24, 20), tmp_path / "o.png", "-q"))
    assert cli_module._KEPT == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("where", ["decode", "encode"])
def test_signal_inside_library_code_is_not_a_file_failure(cli: Callable[..., Result], make_image: Callable[..., Path],
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          where: str) -> None:
    """A signal landing inside a decoder or encoder (code that catches Exception) still interrupts the job."""
    src = tmp_path / "in"
    for i in range(3):
        make_image(f"img{i}.png", 12, 10, seed=i, folder=src)
    fired = []

    def trap(orig: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            if not fired:
                fired.append(True)
                os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises here
            return orig(*args, **kwargs)
        return wrapper

    if where == "decode":
        monkeypatch.setattr(Image.Image, "load", trap(Image.Image.load))
        from PIL import ImageFile
        monkeypatch.setattr(ImageFile.ImageFile, "load", trap(ImageFile.ImageFile.load))
    else:  # PNG outputs are encoded by imagecodecs (libpng)
        import imagecodecs

        monkeypatch.setattr(imagecodecs, "png_encode", trap(imagecodecs.png_encode))
    res = cli("upscale", src, tmp_path / "out")
    assert fired
    assert res.exit_code == 143, res.stderr
    assert "interrupted" in res.stderr and "failed:" not in res.stderr
    assert not list((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------- bitmap, models


def test_bitmap(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("in.png", 40, 30)
    res = cli("bitmap", src, tmp_path / "map.png", "--region", "16")
    _ok(res)
    im = _open(tmp_path / "map.png")
    assert im.format == "PNG" and im.width >= 40
    k = im.width / 40
    assert im.height > 30 * k + 10, "legend strip below the picture"
    assert "FAB" in res.stderr

    _ok(cli("bitmap", src, tmp_path / "l3.png", "--region", "16", "--layer", "3"))
    assert _open(tmp_path / "l3.png").size == im.size

    res = cli("bitmap", src, tmp_path / "l99.png", "--layer", "99")
    assert res.exit_code != 0
    _error_line(res, "--layer")
    assert not (tmp_path / "l99.png").exists()


def test_models_listing_and_unknown_model(monkeypatch: pytest.MonkeyPatch, weights_x2: Path,
                                          make_image: Callable[..., Path], tmp_path: Path) -> None:
    wdir = tmp_path / "weights"
    wdir.mkdir()
    shutil.copy(weights_x2, wdir / "edsr_x2.safetensors")
    entry = {
        "name": "edsr-baseline-x2", "file": "edsr_x2.safetensors", "arch": "edsr_baseline", "scale": 2,
        "sha256": "", "params": 1_376_427,
        "metrics": {"Set5": {"fp32": {"psnr": 37.5}, "dynamic": {"psnr": 37.4, "fab": 5.5}}},
    }
    (wdir / "manifest.json").write_text(json.dumps({"models": [entry]}))
    monkeypatch.setenv("CADYQ_WEIGHTS_DIR", str(wdir))
    runner = CliRunner()

    res = runner.invoke(app, ["models"])
    _ok(res)
    assert "edsr-baseline-x2" in res.stdout
    res = runner.invoke(app, ["models", "--json"])
    _ok(res)
    assert [e["name"] for e in json.loads(res.stdout)] == ["edsr-baseline-x2"]

    src = make_image("in.png", 12, 10)
    _ok(runner.invoke(app, ["upscale", str(src), str(tmp_path / "o.png"), "--model", "edsr-baseline", "--scale", "2",
                            "--threads", "1", "-q"]))
    assert _open(tmp_path / "o.png").size == (24, 20)

    res = runner.invoke(app, ["upscale", str(src), str(tmp_path / "o2.png"), "--model", "nonexistent", "--scale", "2"])
    assert res.exit_code == 2
    assert "edsr-baseline-x2" in _error_line(res, "nonexistent")
    res = runner.invoke(app, ["upscale", str(src), str(tmp_path / "o2.png"), "--model", "edsr-basline", "--scale", "2"])
    assert res.exit_code == 2
    _error_line(res, "did you mean", "edsr-baseline-x2")

    monkeypatch.setenv("CADYQ_WEIGHTS_DIR", str(tmp_path / "empty"))
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 1 and "no shipped weights" in res.stderr


# --------------------------------------------------------------------------- more odd inputs


def test_unicode_and_spaces_in_paths(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src_dir = tmp_path / "fotos ü"
    make_image("ïmage with space.png", 12, 10, folder=src_dir)
    make_image("日本.jpg", 10, 8, folder=src_dir)
    out = tmp_path / "out dir é"
    _ok(cli("upscale", src_dir, out, "-q"))
    assert _open(out / "ïmage with space.png").size == (24, 20)
    assert _open(out / "日本.jpg").size == (20, 16)


def test_la_image_keeps_gray_and_alpha(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("la.png", 14, 10, mode="LA")
    _ok(cli("upscale", src, tmp_path / "out.png", "-q"))
    out = _open(tmp_path / "out.png")
    assert out.mode == "LA" and out.size == (28, 20)


def test_animated_gif_uses_first_frame_with_warning(pattern: Callable[..., np.ndarray], cli: Callable[..., Result],
                                                   tmp_path: Path) -> None:
    frames = [Image.fromarray(pattern(12, 10, seed=s)) for s in (0, 1)]
    src = tmp_path / "anim.gif"
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=100, loop=0)
    res = cli("upscale", src, tmp_path / "out.png")
    _ok(res)
    assert _open(tmp_path / "out.png").size == (24, 20)
    assert "frame" in res.stderr.lower()


def test_kernels_option(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    from cadyq_cli.quant.intconv import int8_available

    src = make_image("k.png", 40, 30)
    outs = {}
    for k in ("float", "auto"):
        res = cli("upscale", src, tmp_path / f"{k}.png", "--kernels", k, "--json", "-", "--quiet")
        _ok(res)
        rec = json.loads(res.stdout)
        assert rec["kernels"] == ("int8" if k == "auto" and int8_available() else "float")
        outs[k] = np.asarray(Image.open(tmp_path / f"{k}.png"), dtype=np.int16)
    assert outs["float"].shape == outs["auto"].shape == (60, 80, 3)
    assert np.abs(outs["float"] - outs["auto"]).mean() < 0.5  # same semantics, float rounding apart
    res = cli("upscale", src, tmp_path / "x.png", "--kernels", "fast")
    assert res.exit_code == 2
    _error_line(res, "--kernels")
    assert not (tmp_path / "x.png").exists()


def test_fp_layers_option(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    src = make_image("f.png", 40, 30)
    res = cli("upscale", src, tmp_path / "b.png", "--fp-layers", "bf16", "--json", "-", "--quiet")
    _ok(res)
    assert json.loads(res.stdout)["fp_layers"] == "bf16"
    assert np.asarray(Image.open(tmp_path / "b.png")).shape == (60, 80, 3)
    res = cli("upscale", src, tmp_path / "x.png", "--fp-layers", "fp16")
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert not (tmp_path / "x.png").exists()


def test_train_stopped_by_a_signal_exits_128_plus_signal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage stopped by SIGTERM has saved its checkpoint, but a script must not go on to the
    next stage as if it had finished: the command exits 143, with one line saying so."""
    import cadyq_cli.train.loop as loop
    from cadyq_cli.train.signals import TrainingStopped

    def stopped(cfg: object, log: object = None) -> Path:
        raise TrainingStopped(signal.SIGTERM, tmp_path / "last.pt")

    monkeypatch.setattr(loop, "train_stage", stopped)
    res = CliRunner().invoke(app, ["train", "fp", "--data", str(tmp_path), "--run", str(tmp_path / "r"), "--bf16", "off"])
    assert res.exit_code == 128 + signal.SIGTERM
    assert "stopped by signal" in _error_line(res, "cadyq train:")


@pytest.mark.parametrize("case", ["missing-data", "no-images", "too-small", "no-init", "missing-init", "bad-stage",
                                  "val-every-0", "scales-text", "scales-edsr"])
def test_train_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if case == "too-small":  # 40 px: no 48 px LR crop at x2
        cv2.imwrite(str(data / "a.png"), np.full((40, 40, 3), 128, np.uint8))
    elif case != "no-images":
        cv2.imwrite(str(data / "a.png"), np.full((200, 200, 3), 128, np.uint8))
    run = tmp_path / "run"
    stage = {"no-init": "pams", "missing-init": "cadyq", "bad-stage": "bogus"}.get(case, "fp")
    argv = ["train", stage, "--data", str(tmp_path / "nope" if case == "missing-data" else data), "--run", str(run),
            "--scale", "2", "--bf16", "off", "--threads", "1"]
    if case == "missing-init":
        argv += ["--init", str(tmp_path / "nope.pt")]
    if case == "val-every-0":  # was a ZeroDivisionError traceback at the first step
        argv += ["--val-every", "0"]
    if case.startswith("scales"):
        argv += ["--scales", "2,x" if case == "scales-text" else "2,4"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.stderr
    line = _error_line(res, "error:")
    assert {"missing-data": "does not exist", "no-images": "no training images", "too-small": "at least 96 px",
            "no-init": "needs --init", "missing-init": "does not exist", "bad-stage": "unknown stage",
            "val-every-0": "--val-every", "scales-text": "separated by commas",
            "scales-edsr": "multi-scale models"}[case] in line
    assert not run.exists()
