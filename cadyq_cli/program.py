"""The ``cadyq`` program (console script, ``python -m cadyq_cli``): the command line of :mod:`cadyq_cli.cli` in a
process of its own.

First thing, before the command line's own imports, ``upscale`` and ``bitmap`` keep numpy's OpenBLAS to one
thread (its pool spins at import), import OpenVINO without its model-conversion package and, on the OpenVINO
runtime, start importing the compiled graph the same request used last time on another thread
(:mod:`cadyq_cli.runtime.prefetch`); then :func:`cadyq_cli.cli.entry` runs the command and ends the process.
"""
from __future__ import annotations

import os
import sys

__all__ = ["entry"]

#: OpenVINO's model-conversion package: ``import openvino`` loads it (and with it OpenVINO's telemetry, which scans
#: the installed distributions) for ``openvino.convert_model``, which the runtime never calls; ~50 ms of start-up
LEAN_SKIP = "openvino.tools.ovc"
#: the commands whose start-up the program shortens (each runs a model on images)
IMAGE_COMMANDS = ("upscale", "bitmap")
#: options that take ``upscale``/``bitmap`` off the OpenVINO runtime (no graph to prefetch)
AWAY_FROM_OPENVINO = {"--kernels", "--engine", "--arch", "--weights", "--bit-bias", "--target-fab", "--device", "--help"}


def _prefetch(argv: list[str]) -> None:
    """Start the prefetch of ``argv``'s graph where it may run on the OpenVINO runtime (never an error: an
    environment whose OpenVINO does not import just runs without it)."""
    names = {tok.partition("=")[0] for tok in argv}
    if len(argv) < 2 or argv[1] not in IMAGE_COMMANDS or AWAY_FROM_OPENVINO & names \
            or os.environ.get("CADYQ_KERNELS", "").lower() == "torch":
        return
    try:
        _import_openvino_lean()
        from .runtime.cache import cache_dir
        from .runtime.prefetch import request_key, start

        start(cache_dir(), request_key(argv))
    except Exception:  # noqa: BLE001 - an optimization only
        return


def _quiet_blas(argv: list[str]) -> None:
    """One OpenBLAS thread for ``upscale``/``bitmap`` (unless the environment says otherwise): numpy's OpenBLAS
    starts a thread pool at import whose threads spin for a while (~0.08 s of CPU in the first 0.3 s), taking a
    core from the graph import and the inference; these commands do no BLAS work in numpy."""
    if len(argv) > 1 and argv[1] in IMAGE_COMMANDS:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _import_openvino_lean() -> None:
    """``import openvino`` without :data:`LEAN_SKIP` (OpenVINO imports it in a ``try`` that ignores an
    ImportError); afterwards it can be imported as usual, only ``openvino.convert_model`` stays unset."""
    if "openvino" in sys.modules or LEAN_SKIP in sys.modules:
        return
    sys.modules[LEAN_SKIP] = None  # type: ignore[assignment]  # makes ``from openvino.tools.ovc import ...`` fail
    try:
        import openvino  # noqa: F401
    finally:
        if sys.modules.get(LEAN_SKIP, "") is None:
            del sys.modules[LEAN_SKIP]


def entry() -> None:
    """Run ``cadyq`` with ``sys.argv``."""
    try:
        _quiet_blas(sys.argv)
        _prefetch(sys.argv)
        from .cli import entry as run

        run()
    finally:  # the process ends normally (it did not end itself): no prefetch may still be inside OpenVINO
        prefetch = sys.modules.get("cadyq_cli.runtime.prefetch")
        if prefetch is not None:
            prefetch.settle()
