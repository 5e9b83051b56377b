"""The ``cadyq`` program (console script, ``python -m cadyq_cli``): the command line of :mod:`cadyq_cli.cli` in a
process of its own.

First thing, before the command line's own imports, ``upscale`` and ``bitmap`` on the OpenVINO runtime start
importing the compiled graph the same request used last time on another thread
(:mod:`cadyq_cli.runtime.prefetch`); then :func:`cadyq_cli.cli.entry` runs the command and ends the process.
"""
from __future__ import annotations

import os
import sys

__all__ = ["entry"]

#: options that take ``upscale``/``bitmap`` off the OpenVINO runtime (no graph to prefetch)
AWAY_FROM_OPENVINO = {"--kernels", "--engine", "--arch", "--weights", "--bit-bias", "--target-fab", "--device", "--help"}


def _prefetch(argv: list[str]) -> None:
    """Start the prefetch of ``argv``'s graph where it may run on the OpenVINO runtime (never an error: an
    environment whose OpenVINO does not import just runs without it)."""
    names = {tok.partition("=")[0] for tok in argv}
    if len(argv) < 2 or argv[1] not in ("upscale", "bitmap") or AWAY_FROM_OPENVINO & names \
            or os.environ.get("CADYQ_KERNELS", "").lower() == "torch":
        return
    try:
        from .runtime.cache import cache_dir
        from .runtime.prefetch import request_key, start

        start(cache_dir(), request_key(argv))
    except Exception:  # noqa: BLE001 - an optimization only
        return


def entry() -> None:
    """Run ``cadyq`` with ``sys.argv``."""
    try:
        _prefetch(sys.argv)
        from .cli import entry as run

        run()
    finally:  # the process ends normally (it did not end itself): no prefetch may still be inside OpenVINO
        prefetch = sys.modules.get("cadyq_cli.runtime.prefetch")
        if prefetch is not None:
            prefetch.settle()
