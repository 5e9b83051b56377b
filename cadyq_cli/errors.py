"""Errors raised by the cadyq library.

Every error carries a one-line message that says what is wrong and what to do.
Only the CLI maps them to exit codes.
"""
from __future__ import annotations


class CadyqError(Exception):
    """Base class of every error the library raises on purpose."""


class ImageReadError(CadyqError):
    """An input image cannot be decoded."""


class ImageTooLargeError(ImageReadError):
    """An input image declares more pixels than allowed (decompression-bomb protection)."""


class ImageWriteError(CadyqError):
    """An output image cannot be written."""


class UnsafeCheckpointError(CadyqError):
    """A checkpoint would need to execute code (pickle globals) to load."""


class CheckpointMismatchError(CadyqError):
    """A checkpoint does not fit the model (keys, shapes or architecture)."""


class CheckpointReadError(CadyqError):
    """A checkpoint file is missing, truncated or not a checkpoint at all."""


class UnknownModelError(CadyqError, KeyError):
    """A model or architecture name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class UnsupportedScaleError(CadyqError, ValueError):
    """The requested upscaling factor is not supported by the architecture."""
