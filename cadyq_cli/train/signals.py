"""Stopping a training run cleanly on SIGTERM / SIGINT."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

__all__ = ["StopSignals", "TrainingStopped"]


class TrainingStopped(Exception):
    """Raised by :func:`~cadyq_cli.train.loop.train_stage` after a signal stopped it and the checkpoint was saved."""

    def __init__(self, signum: int, ckpt: Path) -> None:
        super().__init__(f"stopped by signal {signum}; saved {ckpt}")
        self.signum = signum
        self.ckpt = ckpt


class StopSignals:
    """SIGTERM / SIGINT end training after the current step (then it saves and validates as at
    the time budget, and :class:`TrainingStopped` tells the caller); a second signal interrupts
    at once. Only the main thread can install handlers; a signal that is ignored (SIGINT in a
    job a non-interactive shell started in the background) stays ignored: there, ``kill PID``
    (SIGTERM) is how scripts stop a run cleanly."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)  # type: ignore[arg-type]
        self._old.clear()
