"""``cadyq upscale --engine ray``: a folder of images on a Ray cluster, through Ray Data.

The shape is Ray Data's batch-inference recipe: a dataset of (input, output) path pairs,
``map_batches`` with a callable class run by an actor pool (one model per actor, loaded once),
and the results streamed back to the driver. Each worker runs :func:`batch.run_job`, the
same per-image code as the local engine (read, upscale, atomic write), on paths that every
worker sees (a shared filesystem): outputs are written by the workers, byte-identical to the
local engine's, and only the small per-image reports travel back.

Faults: a bad image fails only itself (``Outcome.error``). A worker killed mid-job is restarted
by Ray and its image retried (Ray Data's actor pools restart actors and retry their tasks, here
at most 3 times); whatever is still missing when the dataset ends (e.g. an image that crashes
every worker) is submitted once more, then reported as failed.
A killed worker may leave a hidden temporary file; it is removed at the end of the run, so no
partial output is ever visible under an output name. Ctrl-C stops the run (exit 130 from the
CLI); rerunning with ``--skip-existing`` finishes the set, each output written once.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tiling import TilingConfig
from .errors import CadyqError
from .io import DEFAULT_MAX_PIXELS, PNG_LEVEL, check_png_level, temp_files
from .batch import Outcome, raise_if_signalled, run_job, skips, upscale_work
from .paths import Job

__all__ = ["RayOptions", "run_ray", "INSTALL_HINT"]

_TASK_RETRIES = 3  # a task whose worker died is retried this often (Ray would retry forever)
_MAX_BLOCKS = 10_000  # one image per block (per-image progress, small retries) up to this many
INSTALL_HINT = "--engine ray needs Ray Data: pip install 'cadyq[ray]' (or pip install 'ray[data]')"


@dataclass(frozen=True)
class RayOptions:
    """How to run a batch on Ray.

    Attributes:
        load: keyword arguments of :func:`cadyq_cli.weights.load_model`, run once per worker.
        openvino: the workers run the model on the OpenVINO runtime instead
            (:func:`cadyq_cli.runtime.engine.load_openvino_model` with ``load``'s model, weights, scale, mode
            and fp_layers), as the local engine does where that runtime serves. The driver's ``CADYQ_*``
            environment (the compiled-graph cache's folder and size, ...) is set in every worker.
        cfg: tiling of every image.
        address: cluster to join (``auto``, ``HOST:PORT``, ``ray://...``); None: the cluster this
            process is already connected to, else a new local one (stopped at the end).
        workers: model replicas (actors); None: as many as the cluster's CPUs allow.
        threads: inference threads (and CPUs reserved) per worker; 0 means 1.
        bit_bias, target_fab: the compute dial, as for the local engine.
        overwrite, skip_existing, max_pixels, png_level: as for the local engine.
    """

    load: dict[str, Any] = field(default_factory=dict)
    openvino: bool = False
    cfg: TilingConfig = field(default_factory=TilingConfig)
    address: str | None = None
    workers: int | None = None
    threads: int = 0
    bit_bias: float = 0.0
    target_fab: float | None = None
    overwrite: bool = False
    skip_existing: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    png_level: int = PNG_LEVEL

    def __post_init__(self) -> None:
        check_png_level(self.png_level)  # refused here, not once per image in the workers


def require_ray() -> None:
    """Raise CadyqError (one line: how to install it) unless Ray Data can be imported."""
    _import_ray()


def _import_ray() -> Any:  # noqa: ANN401
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CadyqError(INSTALL_HINT) from None
    return ray


class _Upscaler:
    """One model replica: Ray Data builds one per actor and feeds it batches of jobs."""

    def __init__(self, load: dict[str, Any], cfg: TilingConfig, threads: int, max_pixels: int | None,
                 bit_bias: float = 0.0, target_fab: float | None = None, png_level: int = PNG_LEVEL,
                 openvino: bool = False, env: dict[str, str] | None = None) -> None:
        os.environ.update(env or {})  # the driver's CADYQ_* settings: this process serves this run alone
        self.cfg, self.max_pixels, self.target_fab, self.png_level = cfg, max_pixels, target_fab, png_level
        self.net, self.broken = None, ""
        try:  # e.g. the weights file is not on this node: every image says so, no endless restarts
            if openvino:  # no bit bias, no FAB target: the driver chose this runtime only without them
                from .runtime.engine import load_openvino_model

                try:
                    self.net = load_openvino_model(load.get("model"), load.get("weights"), load.get("scale", 4),
                                                   load.get("mode", "dynamic"), max(1, threads),
                                                   fp_layers=load.get("fp_layers", "fp32"))
                except CadyqError:
                    raise
                except Exception as e:  # noqa: BLE001 - e.g. OpenVINO broken on this node: one line, not Ray's text
                    raise CadyqError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            else:
                import torch

                from .weights import load_model

                torch.set_num_threads(max(1, threads))
                net = load_model(**load)
                net.set_bit_bias(bit_bias)  # checked by the driver, which loaded the model first
                self.net = net
        except CadyqError as e:
            self.broken = f"this worker cannot load the model ({' '.join(str(e).split())})"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run each job of the batch; the outcomes go back pickled (reports are small)."""
        outs = []
        for blob, overwrite, skip in zip(batch["job"], batch["overwrite"], batch["skip"]):
            job: Job = pickle.loads(blob)
            if self.net is None:
                outs.append(pickle.dumps(Outcome(job, error=f"{job.src}: {self.broken}")))
                continue
            work = upscale_work(self.net, self.cfg, bool(overwrite), self.max_pixels, self.target_fab, self.png_level)
            outs.append(pickle.dumps(run_job(job, work, skip_existing=bool(skip))))
        return {"index": batch["index"], "outcome": np.array(outs, dtype=object)}


@contextmanager
def _settings(ray: Any) -> Iterator[None]:  # noqa: ANN401
    """Ray settings for the length of a run, restored afterwards.

    Quiet: Ray Data's logs and progress bars stay off stderr (the CLI owns it), and the
    driver's printer of cluster error notes ("(raylet) A worker died ...", printed on stdout,
    which carries ``--json -``) is switched off: this run reports lost images itself.
    Tolerant: a failed block does not end the run. An image that kills its worker every time (a
    decoder crash) must fail alone: its block is retried ``_TASK_RETRIES`` times, then dropped,
    and the image reported as missing.
    """
    loggers = [logging.getLogger(n) for n in ("ray", "ray.data", "ray._private", "ray.data._internal")]
    levels = [lg.level for lg in loggers]
    ctx = ray.data.DataContext.get_current()
    fields = {"max_errored_blocks": -1, "enable_progress_bars": False, "print_on_execution_start": False,
              "enable_operator_progress_bars": False}
    saved = {k: getattr(ctx, k) for k in fields if hasattr(ctx, k)}
    try:
        import ray._private.worker as ray_worker

        printer = getattr(ray_worker, "print_to_stdstream", None)
    except ImportError:
        ray_worker = printer = None
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        for k in saved:
            setattr(ctx, k, fields[k])
        if printer is not None:
            ray_worker.print_to_stdstream = _drop_cluster_notes
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for k, v in saved.items():
            setattr(ctx, k, v)
        if printer is not None:
            ray_worker.print_to_stdstream = printer


def _drop_cluster_notes(data: dict[str, Any], ignore_prefix: bool = False) -> None:
    """Stands in for Ray's printer of cluster error notes during a run (see :func:`_settings`)."""


@contextmanager
def _fd2_silenced() -> Iterator[None]:
    """Silence file descriptor 2 (Ray's C++ side writes there directly); Python's sys.stderr is not touched."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _connect(ray: Any, address: str | None, cpus: int) -> bool:  # noqa: ANN401
    """Join ``address`` or start a local cluster; True when this call started the connection."""
    if ray.is_initialized():
        return False
    # Ray's C++ core logs errors to stderr, e.g. one line per actor of a pool with restarts
    # enabled; "fatal" keeps them in the session's log files (and the note it prints about
    # this setting is silenced below).
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        kwargs["num_cpus"] = cpus
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        with _fd2_silenced():
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        what = "cannot start a local Ray cluster" if address is None else f"--ray-address {address}: cannot join the Ray cluster"
        raise CadyqError(f"{what} ({' '.join(str(e).split())[:200]})") from None
    finally:
        if main and handler is not None:  # ray.init installs its own SIGTERM handler; the caller's stays
            signal.signal(signal.SIGTERM, handler)
    return True


def _dataset(ray: Any, rows: list[dict[str, Any]], workers: int, per_worker: int, gpus: int,  # noqa: ANN401
             opts: RayOptions) -> Any:  # noqa: ANN401
    """The lazy Ray Data pipeline: one image per block, ``map_batches`` on an actor pool of ``workers``."""
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), _MAX_BLOCKS))
    kwargs: dict[str, Any] = dict(
        batch_size=1, num_cpus=per_worker, num_gpus=gpus, compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"load": opts.load, "cfg": opts.cfg, "threads": per_worker, "max_pixels": opts.max_pixels,
                               "bit_bias": opts.bit_bias, "target_fab": opts.target_fab, "png_level": opts.png_level,
                               "openvino": opts.openvino,
                               "env": {k: v for k, v in os.environ.items() if k.startswith("CADYQ_")}},
    )
    try:  # extra remote arguments are deprecated in Ray Data (no named parameter for this one yet)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.map_batches(_Upscaler, max_task_retries=_TASK_RETRIES, **kwargs)
    except TypeError:  # a Ray that no longer takes them: its own retry policy applies
        return ds.map_batches(_Upscaler, **kwargs)


def _sweep(jobs: Sequence[Job]) -> None:
    """Remove the temporary files that killed workers left next to the outputs."""
    for tmp in temp_files(job.dst for job in jobs):
        with suppress(OSError):
            tmp.unlink()


def run_ray(jobs: Sequence[Job], opts: RayOptions) -> Iterator[Outcome]:
    """Run ``jobs`` on Ray; the returned iterator yields one :class:`Outcome` per job, as they finish.

    Ray is imported, and the cluster joined or started (only when some job is left to do),
    before this returns, so that every refusal comes before the first image.

    Raises:
        CadyqError: Ray is not installed (the message says how to install it), ``--workers``
            below 1, or the cluster cannot be started or joined.
    """
    ray = _import_ray()
    if opts.workers is not None and opts.workers < 1:
        raise CadyqError("--workers must be at least 1")
    jobs = list(jobs)
    if any(getattr(job, "stdin", False) or getattr(job, "stdout_ext", None) for job in jobs):
        raise CadyqError("--engine ray reads and writes files that every worker sees; for - (stdin/stdout) use --engine local")
    skipped = {i for i, job in enumerate(jobs) if skips(job, opts.skip_existing)}
    # An output absent now and unique in the batch can only exist later because a worker wrote
    # it: a retried job (its worker killed after the rename) may then replace it, same bytes.
    rows, seen = [], set()
    for i, job in enumerate(jobs):
        if i in skipped:
            continue
        fresh = job.dst not in seen and not os.path.lexists(job.dst)
        seen.add(job.dst)
        rows.append({"index": i, "job": pickle.dumps(job),
                     "overwrite": opts.overwrite or fresh, "skip": opts.skip_existing and not fresh})
    per_worker = max(1, opts.threads)
    started = bool(rows) and _connect(ray, opts.address, max(os.cpu_count() or 1, per_worker * (opts.workers or 1)))
    return _stream(ray, jobs, skipped, rows, opts, started)


def _stream(ray: Any, jobs: list[Job], skipped: set[int], rows: list[dict[str, Any]],  # noqa: ANN401
            opts: RayOptions, started: bool) -> Iterator[Outcome]:
    todo = {r["index"]: jobs[r["index"]] for r in rows}
    gpus = 1 if str(opts.load.get("device", "cpu")).startswith("cuda") else 0  # one GPU per worker (not tested here)
    try:
        for i in sorted(skipped):
            yield Outcome(jobs[i], skipped=True)
        if not rows:
            return
        with _settings(ray):
            try:
                for out in _attempts(ray, rows, todo, opts, gpus):
                    yield out
                    raise_if_signalled()  # as the local engine between jobs: a signal whose raise was lost stops here
            finally:
                if started:
                    ray.shutdown()
    finally:
        _sweep([jobs[r["index"]] for r in rows])


def _attempts(ray: Any, rows: list[dict[str, Any]], todo: dict[int, Job], opts: RayOptions,  # noqa: ANN401
              gpus: int) -> Iterator[Outcome]:
    """Run the jobs of ``todo`` (popped as their outcomes come back); the still missing ones go once more."""
    per_worker = max(1, opts.threads)
    lost = ""
    for _attempt in range(2):  # Ray retries killed workers; what is still missing goes once more
        rest = [r for r in rows if r["index"] in todo]
        if not rest:
            break
        try:
            workers = opts.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // per_worker)
            ds = _dataset(ray, rest, min(workers, len(rest)), per_worker, gpus, opts)
            for row in ds.iter_rows():
                out = pickle.loads(row["outcome"])
                if todo.pop(int(row["index"]), None) is not None:
                    yield out
        except Exception as e:  # noqa: BLE001 - Ray's errors have many types; the images are retried or reported
            lost = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(e).split()))[:200] or type(e).__name__
    for job in list(todo.values()):
        yield Outcome(job, error=f"{job.src}: not processed on the Ray cluster ({lost or 'no result came back'})")
