"""The batch layer under the CLI: outcomes per job, skipping, failures that do not stop the batch, signals."""
from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import _lose_a_signal

from cadyq_cli.batch import Interrupted, Outcome, bitmap_jobs, run_jobs, stop_on_signals, upscale_jobs
from cadyq_cli.engine import TilingConfig
from cadyq_cli.errors import ImageReadError
from cadyq_cli.paths import Job, plan_jobs


def test_upscale_jobs_yields_every_outcome(load_x2: Callable[[str], object], make_image: Callable[..., Path],
                                           tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        make_image(name, 20, 16, folder=src)
    (src / "bad.png").write_bytes(b"not a png")
    jobs = plan_jobs(src, tmp_path / "out", scale=2)
    (tmp_path / "out").mkdir()
    jobs[1].dst.write_bytes(b"x")  # b's output exists already
    model = load_x2("dynamic")
    outs = list(upscale_jobs(model, jobs, TilingConfig(region=16), skip_existing=True))
    assert [o.job.src.name for o in outs] == ["a.png", "b.png", "bad.png", "c.png"]
    assert [o.status for o in outs] == ["done", "skipped", "failed", "done"]
    assert outs[0].report is not None and outs[0].report.scale == 2 and outs[0].job.dst.exists()
    assert "bad.png" in (outs[2].error or "") and not outs[2].job.dst.exists()
    assert jobs[1].dst.read_bytes() == b"x"  # skipped: untouched


def test_bitmap_jobs_draws_the_heatmap(load_x2: Callable[[str], object], make_image: Callable[..., Path],
                                       tmp_path: Path) -> None:
    src = make_image("m.png", 40, 30)
    (out,) = bitmap_jobs(load_x2("dynamic"), [Job(src, tmp_path / "map.png")], TilingConfig(region=16), layer=2)
    assert out.status == "done" and out.report.n_selectors == 32 and (tmp_path / "map.png").stat().st_size > 0


def test_run_jobs_raise_errors_and_progress(tmp_path: Path) -> None:
    jobs = [Job(tmp_path / f"{i}.png", tmp_path / f"{i}_x2.png") for i in range(3)]
    started: list[str] = []

    def work(job: Job, tile_progress: object) -> tuple[object, list[str]]:
        if job.src.name == "1.png":
            raise ImageReadError(f"{job.src}: broken")
        if job.src.name == "2.png":
            raise RuntimeError("out of memory\nat line 2")  # a bug or a resource: fails its image only
        return object(), ["w"]

    outs = list(run_jobs(jobs, work, on_start=lambda j: started.append(j.src.name)))
    assert [o.status for o in outs] == ["done", "failed", "failed"] and outs[0].warnings == ["w"]
    assert outs[2].error.endswith("2.png: internal error (RuntimeError: out of memory at line 2)")
    assert started == ["0.png", "1.png", "2.png"] and isinstance(outs[1], Outcome)
    with pytest.raises(ImageReadError):
        list(run_jobs(jobs, work, raise_errors=True))


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_become_interrupted_and_handlers_come_back(sig: signal.Signals, code: int) -> None:
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as info:
        with stop_on_signals():
            os.kill(os.getpid(), sig)
            signal.sigtimedwait([], 0.1) if hasattr(signal, "sigtimedwait") else None
    assert info.value.code == code
    assert signal.getsignal(sig) is before


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_a_signal_whose_raise_was_swallowed_still_stops_the_batch(tmp_path: Path) -> None:
    """The handler's exception can land in a weakref callback run by the garbage collector, where Python
    prints and drops it (seen on CI: logging's ``_removeHandlerRef``, then the whole batch ran and ended 0).
    The batch loop must stop at the next job all the same, and the context must raise on leaving."""
    jobs = [Job(tmp_path / f"{i}.png", tmp_path / f"{i}_x2.png") for i in range(3)]
    ran: list[str] = []

    def work(job: Job, tile_progress: object) -> tuple[object, list[str]]:
        ran.append(job.src.name)
        _lose_a_signal(signal.SIGTERM)
        return object(), []

    with pytest.raises(Interrupted) as info:
        with stop_on_signals():
            list(run_jobs(jobs, work))
    assert info.value.code == 143 and ran == ["0.png"]
    with pytest.raises(Interrupted):
        with stop_on_signals():
            _lose_a_signal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:  # a lost signal, then another failure: the signal decides the exit
        with stop_on_signals():
            _lose_a_signal(signal.SIGTERM)
            raise ValueError("what the lost signal left behind")
    assert info.value.code == 143 and isinstance(info.value.__cause__, ValueError)
    with stop_on_signals():  # a new context starts clean
        pass
    list(run_jobs(jobs, work=lambda job, tp: (object(), [])))  # and outside one, nothing is left pending
