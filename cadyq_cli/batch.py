"""The batch layer: run planned jobs one by one, yield what happened to each, stop cleanly on signals.

Both ``cadyq upscale`` and ``cadyq bitmap`` (and library users) go through :func:`run_jobs`: it
skips existing outputs when asked, turns a failing image into a ``failed`` :class:`Outcome` and
goes on, and leaves the rest (printing, JSON lines, exit codes) to the caller. :func:`stop_on_signals`
turns SIGINT/SIGTERM into :class:`Interrupted`, so that whatever runs finishes its cleanup (temporary
files, open sinks) and the caller can report and exit with ``128 + signal``.
"""
from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from .errors import CadyqError
from .io import PNG_LEVEL, check_png_level
from .paths import Job

if TYPE_CHECKING:
    from .tiling import TilingConfig
    from .models._base import SRModel
    from .report import ImageReport

__all__ = ["Outcome", "Interrupted", "stop_on_signals", "raise_if_signalled", "skips", "run_job", "run_jobs", "upscale_work", "upscale_jobs", "bitmap_jobs"]

#: ``work(job, tile_progress)`` -> (report, warnings): what is done to one job.
Work = Callable[[Job, "Callable[[int, int], None] | None"], "tuple[ImageReport, list[str]]"]


@dataclass
class Outcome:
    """What became of one job: skipped, done (``report`` and ``warnings``), or failed (``error``, one line).

    Both engines (this process, :func:`run_jobs`; a Ray cluster, :mod:`cadyq_cli.batch_ray`) yield
    these, so the CLI reports, writes JSON lines and lists failures the same way for either.
    """

    job: Job
    report: ImageReport | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: bool = False

    @property
    def status(self) -> str:
        """``done``, ``skipped`` or ``failed``."""
        return "skipped" if self.skipped else "failed" if self.error is not None else "done"


class Interrupted(BaseException):  # not Exception: library code that catches Exception must not swallow it
    """A signal stopped the batch; ``code`` is the exit status it calls for (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


_received: list[int] = []  # exit codes of the signals caught inside stop_on_signals, first first


def _on_signal(signum: int, frame: object) -> None:
    _received.append(128 + signum)
    raise Interrupted(128 + signum)


def raise_if_signalled() -> None:
    """Raise :class:`Interrupted` if a signal arrived inside :func:`stop_on_signals`.

    The handler raises where the main thread happens to be, and that can be a weakref callback or a
    ``__del__`` run by the garbage collector, where Python prints the exception and drops it: the batch
    loops call this between jobs so that such a signal still stops them."""
    if _received:
        raise Interrupted(_received[0])


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back (POSIX) while handlers are swapped: one arriving mid-swap waits until after."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise :class:`Interrupted`: where they arrive, or on leaving if that raise
    was lost, also in place of another exception raised after it; the previous handlers come back after.
    Not reentrant (nothing nests it)."""
    with _signals_blocked():
        _received.clear()
        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
        raise_if_signalled()
    except Interrupted:
        raise
    except BaseException as e:  # a lost signal, then a failure caused by it or not: the signal decides the exit
        if _received:
            raise Interrupted(_received[0]) from e
        raise
    finally:
        with _signals_blocked():
            for s, h in old.items():
                signal.signal(s, h)
            _received.clear()


def skips(job: Job, skip_existing: bool) -> bool:
    """True when ``skip_existing`` leaves this job alone (its output file exists)."""
    return skip_existing and job.stdout_ext is None and job.dst.exists()


def run_job(job: Job, work: Work, *, skip_existing: bool = False,
            tile_progress: Callable[[int, int], None] | None = None, raise_errors: bool = False) -> Outcome:
    """Do ``work`` to one job: an existing output is skipped with ``skip_existing``; a
    :class:`~cadyq_cli.errors.CadyqError` becomes ``Outcome.error``, and so does any other exception
    (as a one-line internal error: a bug on one image must not sink the batch); ``raise_errors``
    re-raises instead, for debugging."""
    if skips(job, skip_existing):
        return Outcome(job, skipped=True)
    try:
        report, warnings = work(job, tile_progress)
    except CadyqError as e:
        if raise_errors:
            raise
        return Outcome(job, error=str(e))
    except Exception as e:  # noqa: BLE001 - see the docstring
        if raise_errors:
            raise
        return Outcome(job, error=f"{job.src}: internal error ({type(e).__name__}: {' '.join(str(e).split())})")
    return Outcome(job, report, warnings)


def run_jobs(jobs: Iterable[Job], work: Work, *, skip_existing: bool = False,
             on_start: Callable[[Job], None] | None = None,
             tile_progress: Callable[[int, int], None] | None = None,
             raise_errors: bool = False) -> Iterator[Outcome]:
    """The local engine: :func:`run_job` on each job in turn, in this process; yields the outcomes in order."""
    for job in jobs:
        raise_if_signalled()
        if on_start is not None and not skips(job, skip_existing):
            on_start(job)
        yield run_job(job, work, skip_existing=skip_existing, tile_progress=tile_progress, raise_errors=raise_errors)


def _upscale(model: SRModel, cfg: TilingConfig, overwrite: bool, max_pixels: int | None, target_fab: float | None,
             png_level: int, job: Job, tile_progress: Callable[[int, int], None] | None) -> tuple[ImageReport, list[str]]:
    from .pipeline import upscale_file

    return upscale_file(model, job, cfg, overwrite, max_pixels, tile_progress, target_fab, png_level)


def upscale_work(model: SRModel, cfg: TilingConfig, overwrite: bool = False, max_pixels: int | None = None,
                 target_fab: float | None = None, png_level: int = PNG_LEVEL) -> Work:
    """The work of an upscale job (:func:`~cadyq_cli.pipeline.upscale_file` with these settings); ValueError for
    a ``png_level`` outside 0..9."""
    return partial(_upscale, model, cfg, overwrite, max_pixels, target_fab, check_png_level(png_level))


def upscale_jobs(model: SRModel, jobs: Iterable[Job], cfg: TilingConfig, *, overwrite: bool = False,
                 skip_existing: bool = False, max_pixels: int | None = None, target_fab: float | None = None,
                 png_level: int = PNG_LEVEL, **kw: object) -> Iterator[Outcome]:
    """:func:`run_jobs` upscaling each job."""
    return run_jobs(jobs, upscale_work(model, cfg, overwrite, max_pixels, target_fab, png_level),
                    skip_existing=skip_existing, **kw)  # type: ignore[arg-type]


def _bitmap(model: SRModel, cfg: TilingConfig, layer: int | None, overwrite: bool, max_pixels: int | None,
            png_level: int, job: Job, tile_progress: Callable[[int, int], None] | None) -> tuple[ImageReport, list[str]]:
    from .pipeline import bitmap_file

    return bitmap_file(model, job, cfg, layer, overwrite, max_pixels, tile_progress, png_level)


def bitmap_jobs(model: SRModel, jobs: Iterable[Job], cfg: TilingConfig, *, layer: int | None = None,
                overwrite: bool = False, max_pixels: int | None = None, png_level: int = PNG_LEVEL,
                **kw: object) -> Iterator[Outcome]:
    """:func:`run_jobs` drawing each job's bit-allocation heatmap (:func:`~cadyq_cli.pipeline.bitmap_file`)."""
    work = partial(_bitmap, model, cfg, layer, overwrite, max_pixels, check_png_level(png_level))
    return run_jobs(jobs, work, **kw)  # type: ignore[arg-type]
