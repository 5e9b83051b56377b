"""``cadyq upscale --engine ray``: same outputs and reports as the local engine, faults, resume.

Every Ray test shares one local cluster (``ray_cluster`` in conftest.py: 2 CPUs) and the tiny
random-weight x2 checkpoint; they skip when the ``ray`` extra is not installed. The CLI runs
in-process (it reuses the cluster) except for the Ctrl-C test, a real process that joins the
cluster with ``--ray-address``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from cadyq_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cli(weights_x2: Path) -> Callable[..., Result]:
    """``cli(*args)``: the app in-process with the x2 checkpoint on one thread."""
    runner = CliRunner()

    def run(*args: object) -> Result:
        argv = [str(a) for a in args] + ["--weights", str(weights_x2), "--scale", "2", "--threads", "1"]
        return runner.invoke(app, argv)

    return run


def _folder(root: Path, pattern: Callable[..., np.ndarray], n: int, size: tuple[int, int] = (24, 18)) -> Path:
    """``n`` images of several formats and modes, two of them in a sub-folder."""
    src = root / "in"
    kinds = [("png", "RGB"), ("jpg", "RGB"), ("webp", "RGB"), ("tif", "RGB"), ("png", "RGBA"), ("png", "L")]
    for i in range(n):
        ext, mode = kinds[i % len(kinds)]
        arr = pattern(*size, channels={"RGB": 3, "RGBA": 4, "L": 1}[mode], seed=i)
        path = src / ("sub" if i >= n - 2 else "") / f"img{i:02d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode).save(path, **({"lossless": True} if ext == "webp" else {}))
    return src


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _decodes(path: Path) -> bool:
    with Image.open(path) as im:
        im.load()
    return True


def test_without_ray_says_how_to_install(cli: Callable[..., Result], make_image: Callable[..., Path],
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_image("a.png", folder=tmp_path / "in")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    res = cli("upscale", tmp_path / "in", tmp_path / "out", "--engine", "ray")
    assert res.exit_code == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'cadyq[ray]'" in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_ray_options_need_the_ray_engine(cli: Callable[..., Result], make_image: Callable[..., Path], tmp_path: Path) -> None:
    make_image("a.png", folder=tmp_path / "in")
    res = cli("upscale", tmp_path / "in", tmp_path / "out", "--workers", "2")
    assert res.exit_code == 2 and "--engine ray" in res.stderr and not (tmp_path / "out").exists()


def test_other_uri_schemes_refused_in_one_line(cli: Callable[..., Result], tmp_path: Path) -> None:
    res = cli("upscale", "s3://bucket/photos", tmp_path / "out", "--engine", "ray")
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not supported yet" in lines[0] and "Traceback" not in res.stderr


def test_corrupt_file_fails_alone_and_outputs_equal_local(ray_cluster: str, cli: Callable[..., Result],
                                                         pattern: Callable[..., np.ndarray], tmp_path: Path) -> None:
    src = _folder(tmp_path, pattern, 7)
    good = (src / "img00.png").read_bytes()
    (src / "bad.png").write_bytes(good[: len(good) // 2])  # truncated: the 8th file
    opts = ("-r", "-q")
    local = cli("upscale", src, tmp_path / "local", "--json", tmp_path / "local.jsonl", *opts)
    ray_ = cli("upscale", f"file://{src}", f"file://{tmp_path / 'ray'}", "--engine", "ray", "--workers", "2",
               "--json", tmp_path / "ray.jsonl", *opts)
    for res in (local, ray_):
        assert res.exit_code == 1, res.stderr
        assert "bad.png" in res.stderr and "Traceback" not in res.stderr
    assert len(_outputs(tmp_path / "local")) == 7
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")  # byte-identical, same names
    assert not _tmp_files(tmp_path / "ray")

    recs = {e: _lines(tmp_path / f"{e}.jsonl") for e in ("local", "ray")}
    for engine, lines in recs.items():
        assert len(lines) == 8
        fails = [r for r in lines if "error" in r]
        assert len(fails) == 1 and fails[0]["input"] == str(src / "bad.png") and "truncated" in fails[0]["error"]
        assert set(fails[0]) == {"input", "output", "model", "error"}
        assert fails[0]["output"] == str(tmp_path / engine / "bad.png")
        assert {r["input"] for r in lines} == {str(p) for p in src.rglob("*") if p.is_file()}
    by_input = {e: {r["input"]: r for r in lines if "error" not in r} for e, lines in recs.items()}
    for name, rec in by_input["local"].items():
        other = by_input["ray"][name]
        assert {k: v for k, v in rec.items() if k not in ("output", "seconds")} == \
               {k: v for k, v in other.items() if k not in ("output", "seconds")}

    # resume once the bad file is gone: everything is skipped, nothing is rewritten
    before = _stamps(tmp_path / "ray")
    (src / "bad.png").unlink()
    done = cli("upscale", src, tmp_path / "ray", "--engine", "ray", "--skip-existing", "--json", tmp_path / "r2.jsonl",
               *opts[:1])
    assert done.exit_code == 0 and "7 skipped, 0 failed" in done.stderr, done.stderr
    assert _stamps(tmp_path / "ray") == before and not (tmp_path / "r2.jsonl").read_text()


@pytest.mark.skipif(os.name != "posix", reason="POSIX processes")
def test_a_shipped_model_runs_on_the_local_engines_runtime(ray_cluster: str, pattern: Callable[..., np.ndarray],
                                                          tmp_path: Path) -> None:
    """A shipped model: the workers run it on the runtime the local engine uses (OpenVINO where it serves), so the
    outputs are byte-identical and the reports say the same kernels; the workers compile into the driver's
    CADYQ_CACHE_DIR. Both runs are processes of their own (a process that loaded OpenVINO's runtime must not be
    this one: tests/test_openvino.py)."""
    pytest.importorskip("openvino")
    src = _folder(tmp_path, pattern, 4, size=(40, 32))
    env = _proc_env(CADYQ_CACHE_DIR=str(tmp_path / "cache"))
    common = ["--model", "edsr-baseline", "--scale", "2", "--threads", "1", "-r", "-q"]
    recs = {}
    for engine, extra in (("ray", ["--engine", "ray", "--ray-address", ray_cluster, "--workers", "1"]), ("local", [])):
        res = subprocess.run([sys.executable, "-m", "cadyq_cli", "upscale", str(src), str(tmp_path / engine),
                              "--json", str(tmp_path / f"{engine}.jsonl"), *common, *extra],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        recs[engine] = _lines(tmp_path / f"{engine}.jsonl")
        if engine == "ray":  # the worker's compiled graphs went to the driver's cache folder
            assert any((tmp_path / "cache").rglob("*.blob"))
    assert len(_outputs(tmp_path / "local")) == 4
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")  # byte-identical
    kernels = {e: {r["kernels"] for r in lines} for e, lines in recs.items()}
    assert kernels["ray"] == kernels["local"] and kernels["local"] <= {"openvino", "openvino-float"}, kernels


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_ctrl_c_with_openvino_workers_then_resume(ray_cluster: str, pattern: Callable[..., np.ndarray],
                                                  tmp_path: Path) -> None:
    """Ctrl-C a run whose workers hold OpenVINO (a shipped model), then resume and SIGKILL one of its workers: exit
    130, no partial or temporary file, and the resumed run writes the rest, each output once."""
    pytest.importorskip("openvino")
    n = 24
    src = _folder(tmp_path, pattern, n, size=(160, 120))
    out = tmp_path / "out"
    env = _proc_env(CADYQ_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "cadyq_cli", "upscale", str(src), str(out), "-r", "--engine", "ray", "--ray-address",
           ray_cluster, "--workers", "2", "--model", "edsr-baseline", "--scale", "2", "--threads", "1"]
    run = _interrupt_once_written(cmd, env, out)
    assert run.returncode == 130, run.stderr
    assert "interrupted" in run.stderr and "Traceback" not in run.stderr
    first = _stamps(out)
    assert 0 < len(first) < n and not _tmp_files(out)
    with _killing_a_worker(out, len(first)) as killed:
        res = subprocess.run([*cmd, "--skip-existing", "-q", "--json", str(tmp_path / "second.jsonl")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert killed, "no worker was killed: the test did not test anything"
    final = _stamps(out)
    assert len(final) == n and not _tmp_files(out) and all(final[k] == v for k, v in first.items())
    assert all(_decodes(out / k) for k in final)
    second = _lines(tmp_path / "second.jsonl")  # the resumed run reported each of the others once, no error
    assert not any("error" in r for r in second)
    assert sorted(Path(r["output"]).relative_to(out).as_posix() for r in second) == sorted(k for k in final if k not in first)


def test_a_worker_that_cannot_load_its_openvino_model_fails_each_image_in_one_line(
        ray_cluster: str, pattern: Callable[..., np.ndarray], tmp_path: Path) -> None:
    """A worker whose node lacks the weights (here: a path no node has) fails every image with one line."""
    pytest.importorskip("openvino")
    from cadyq_cli.batch_ray import RayOptions, run_ray
    from cadyq_cli.paths import plan_jobs

    src = _folder(tmp_path, pattern, 3)
    opts = RayOptions(load={"weights": str(tmp_path / "elsewhere.safetensors"), "scale": 2}, openvino=True, workers=1)
    outcomes = list(run_ray(plan_jobs(src, tmp_path / "out", recursive=True), opts))
    assert len(outcomes) == 3 and all(o.error for o in outcomes)
    for o in outcomes:
        assert "this worker cannot load the model" in o.error and "elsewhere.safetensors" in o.error
        assert "\n" not in o.error and "Traceback" not in o.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


def _map_workers() -> list[int]:
    """PIDs of this test run's Ray Data actors (``ray::MapWorker(...)``, descendants of this process)."""

    def ppid(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "MapWorker" not in cmd or "_Upscaler" not in cmd:
            continue
        p, hops = int(d.name), 0
        while p > 1 and hops < 8:
            p, hops = ppid(p), hops + 1
            if p == os.getpid():
                found.append(int(d.name))
                break
    return found


@contextmanager
def _killing_a_worker(out: Path, already: int) -> Iterator[list[int]]:
    """While the body runs, SIGKILL one of this test run's Ray workers once ``out`` holds more than ``already``
    finished outputs; yields the list of killed PIDs (one, or none if the body ended first)."""
    killed: list[int] = []
    stop = threading.Event()

    def finished() -> int:  # no stat: a temporary file may be renamed between listing and looking at it
        try:
            return sum(1 for p in out.rglob("*") if not p.name.endswith(".tmp") and p.is_file())
        except OSError:  # a folder changed under the listing: look again
            return 0

    def killer() -> None:
        while not stop.is_set() and not killed:
            pids = _map_workers()
            if pids and finished() > already:
                try:
                    os.kill(pids[0], signal.SIGKILL)
                except ProcessLookupError:  # it ended on its own: try the next one
                    continue
                killed.append(pids[0])
            time.sleep(0.1)  # each look reads every process's cmdline: not a busy loop beside the workers

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        thread.join(5)


def _written(folder: Path) -> bool:
    return folder.exists() and any(p.suffix != ".tmp" for p in folder.rglob("*.*"))


def _proc_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m cadyq_cli`` process that imports this checkout, with ``extra`` added."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **extra}


def _interrupt_once_written(cmd: list[str], env: dict[str, str], out: Path) -> subprocess.CompletedProcess:
    """Run ``cmd``, send it SIGINT as soon as it has written an output under ``out``, and wait for it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not _written(out):
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.skipif(os.name != "posix" or not Path("/proc/self/cmdline").exists(),
                    reason="POSIX signals; finds the worker processes through /proc")
def test_ctrl_c_then_resume_with_a_worker_killed(ray_cluster: str, cli: Callable[..., Result], weights_x2: Path,
                                                 pattern: Callable[..., np.ndarray], tmp_path: Path) -> None:
    """Ctrl-C a real run (it joins the cluster), then resume with --skip-existing and SIGKILL one of its workers:
    no image lost, no partial or temporary file, every output written exactly once."""
    n = 32
    src = _folder(tmp_path, pattern, n, size=(96, 80))  # seconds of work: the interrupt and the kill land mid-run
    out = tmp_path / "out"
    run = _interrupt_once_written(
        [sys.executable, "-m", "cadyq_cli", "upscale", str(src), str(out), "-r", "--engine", "ray", "--ray-address",
         ray_cluster, "--workers", "1", "--weights", str(weights_x2), "--scale", "2", "--threads", "1", "--json", "-"],
        _proc_env(), out)
    stdout, stderr = run.stdout, run.stderr
    assert run.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    first = _stamps(out)
    assert 0 < len(first) < n, "the interrupt should land mid-batch"
    assert not _tmp_files(out)
    # stdout holds JSON lines only; workers may have written images whose reports had not reached the
    # driver yet: never more lines than files
    assert len([json.loads(line) for line in stdout.splitlines()]) <= len(first)

    with _killing_a_worker(out, len(first)) as killed:  # once the resumed run writes its first image
        res = cli("upscale", src, out, "-r", "-q", "--engine", "ray", "--workers", "2", "--skip-existing",
                  "--json", tmp_path / "second.jsonl")
    assert res.exit_code == 0, res.stderr
    assert killed, "no worker was killed: the test did not test anything"
    final = _stamps(out)
    assert len(final) == n and not _tmp_files(out)
    assert all(_decodes(out / k) for k in final)
    assert all(final[k] == v for k, v in first.items())  # the first run's outputs were not rewritten
    second = _lines(tmp_path / "second.jsonl")
    assert not any("error" in r for r in second)
    assert sorted(Path(r["output"]).relative_to(out).as_posix() for r in second) == sorted(k for k in final if k not in first)
