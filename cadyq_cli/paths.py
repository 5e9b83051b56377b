"""Where each output goes, decided (and refused) before any model is loaded.

Rules of ``cadyq upscale INPUT [OUTPUT]``:

* no OUTPUT: ``<stem>_x<scale>.png`` next to an input file; a folder ``<dir>_x<scale>`` beside
  an input folder. Existing files are never replaced without ``--overwrite``.
* OUTPUT ending in ``/`` or an existing folder, for an input file: ``OUTPUT/<stem>_x<scale>.png``
  (the folder is created).
* an image-like OUTPUT name (``out.png``) for an input folder is refused.
* OUTPUT ``-`` writes the image to stdout (PNG, or ``--ext``); INPUT ``-`` reads it from stdin.
* an output file extension that cannot be written is refused, listing the formats.

``--suffix`` replaces the ``_x<scale>`` of generated names; ``--ext`` their ``.png``. No torch here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import CadyqError, ImageWriteError
from .io import INPUT_EXTENSIONS, OUTPUT_FORMATS

__all__ = ["STDIO", "INPUT_EXTS", "Job", "plan_jobs", "output_folder", "check_extension", "check_output", "local_path"]

STDIO = "-"
"""INPUT or OUTPUT spelled ``-``: stdin or stdout (a file named ``-`` is ``./-``)."""

INPUT_EXTS = frozenset(INPUT_EXTENSIONS)


@dataclass(frozen=True)
class Job:
    """One input and the output it becomes.

    Attributes:
        src: input file (``-`` with ``stdin``).
        dst: output file (``-`` with ``stdout_ext``).
        stdin: read the input from stdin.
        stdout_ext: write the output to stdout in this format (``.png``, ...); None: to ``dst``.
    """

    src: Path
    dst: Path
    stdin: bool = False
    stdout_ext: str | None = None


def _formats() -> str:
    return ", ".join(dict.fromkeys(e.lstrip(".") for e in OUTPUT_FORMATS))


def _norm_ext(ext: str | None) -> str | None:
    """``--ext`` as ``.png``; CadyqError for a format we cannot write."""
    if ext is None:
        return None
    dot = "." + ext.lstrip(".").lower()
    if dot not in OUTPUT_FORMATS:
        raise CadyqError(f"--ext {ext}: cannot write that format; use one of {_formats()}")
    return dot


def _renamed(rel: Path, suffix: str, ext: str | None) -> Path:
    return rel.with_name(rel.stem + suffix + (ext or rel.suffix))


def _generated(stem: str, scale: int, suffix: str, ext: str | None) -> str:
    """Name of an output we choose: ``<stem>_x<scale>.png`` (``--suffix``/``--ext`` replace parts)."""
    return stem + (suffix or f"_x{scale}") + (ext or ".png")


def check_extension(dst: Path) -> Path:
    """``dst`` itself, when its extension is a format we write; CadyqError listing the formats otherwise."""
    if dst.suffix.lower() not in OUTPUT_FORMATS:
        what = f"unknown extension {dst.suffix!r}" if dst.suffix else "no extension"
        raise CadyqError(f"{dst}: {what}; use one of {_formats()} (or end the name with / for a folder)")
    return dst


def _is_folder(raw: str) -> bool:
    return raw.endswith(("/", os.sep)) or Path(raw).is_dir()


def plan_jobs(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None,
    recursive: bool = False,
    suffix: str = "",
    ext: str | None = None,
    scale: int = 4,
) -> list[Job]:
    """Pairs of (input, output) for a file, stdin or folder input (rules in the module doc).

    ``src``/``dst`` are taken as typed: a trailing ``/`` marks a folder and ``-`` means
    stdin/stdout, so pass the raw strings (``Path`` drops the slash).

    Raises:
        CadyqError: input missing, an output that does not fit the input, or an output
            format we cannot write.
    """
    dot_ext = _norm_ext(ext)
    src_raw, dst_raw = os.fspath(src), None if dst is None else os.fspath(dst)
    src_path = Path(src_raw)
    stdin = src_raw == STDIO
    if not stdin and not src_path.exists():
        raise CadyqError(f"{src_raw}: no such file or folder")

    if stdin or src_path.is_file():
        stem = "stdin" if stdin else src_path.stem
        if dst_raw is None:
            if stdin:
                raise CadyqError("input - (stdin) needs an output: a file, a folder, or - for stdout")
            out = src_path.parent / _generated(stem, scale, suffix, dot_ext)
        elif dst_raw == STDIO:
            return [Job(src_path, Path(STDIO), stdin, dot_ext or ".png")]
        elif _is_folder(dst_raw):
            out = Path(dst_raw) / _generated(stem, scale, suffix, dot_ext)
        else:
            out = check_extension(_renamed(Path(dst_raw), suffix, dot_ext) if suffix or dot_ext else Path(dst_raw))
        return [Job(src_path, out, stdin)]

    out_dir = output_folder(src_path, dst_raw, scale)
    pattern = src_path.rglob("*") if recursive else src_path.glob("*")
    files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in INPUT_EXTS and not p.name.startswith("."))
    try:  # never descend into our own output folder
        dst_res = out_dir.resolve()
        files = [p for p in files if dst_res not in p.resolve().parents]
    except OSError:
        pass
    jobs, seen = [], {}
    for p in files:  # an input format we cannot write (GIF) becomes PNG
        rel = p.relative_to(src_path)
        dst = out_dir / _renamed(rel, suffix, dot_ext or (None if rel.suffix.lower() in OUTPUT_FORMATS else ".png"))
        if dst in seen:
            raise CadyqError(f"{seen[dst]} and {p} would both be written to {dst}; use --suffix, or leave out --ext")
        seen[dst] = p
        jobs.append(Job(p, dst))
    return jobs


def output_folder(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None, scale: int = 4) -> Path:
    """Output folder for the input folder ``src``: ``dst``, or ``<src>_x<scale>`` beside ``src``.

    Raises:
        CadyqError: ``dst`` is ``-``, an existing file, named like an image (``out.png``), or
            inside a file.
    """
    src_path = Path(src)
    if dst is None:
        base = src_path if src_path.name not in ("", ".", "..") else src_path.resolve()
        return base.parent / f"{base.name}_x{scale}"
    raw = os.fspath(dst)
    if raw == STDIO:
        raise CadyqError(f"{src} is a folder; - (stdout) takes a single image")
    out = Path(raw)
    if out.exists() and not out.is_dir():
        raise CadyqError(f"{raw}: the input is a folder, so the output must be a folder")
    if not _is_folder(raw) and out.suffix.lower() in OUTPUT_FORMATS.keys() | INPUT_EXTS:
        raise CadyqError(f"{raw}: the input is a folder, so the output must be a folder, not an image name")
    blocker = _file_in_the_way(out)
    if blocker is not None:
        raise CadyqError(f"cannot create the output folder {raw}: {blocker} is not a directory")
    return out


def _file_in_the_way(path: Path) -> Path | None:
    """The first ancestor of ``path`` that exists and is not a folder."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(job: Job, overwrite: bool) -> None:
    """Refuse an output that would replace the input, an existing file, or lie inside a file.

    Raises:
        ImageWriteError: one line naming the path and what to do.
    """
    if job.stdout_ext is not None:
        return
    if not job.stdin and _same_file(job.src, job.dst):
        raise ImageWriteError(f"{job.dst}: refusing to overwrite the input file")
    if job.dst.exists() and not overwrite:
        raise ImageWriteError(f"{job.dst}: output exists (use --overwrite or --skip-existing)")
    blocker = _file_in_the_way(job.dst)
    if blocker is not None:
        raise ImageWriteError(f"cannot write {job.dst}: {blocker} is not a directory")


_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


def local_path(arg: str) -> str:
    """A path argument as a local path: ``file://`` URIs are accepted, other schemes refused.

    ``s3://``, ``gs://`` and the like are not supported yet: the workers of ``--engine ray``
    write with ordinary file operations, so every worker must see the folders on a shared
    filesystem. Anything else (``-``, plain paths) comes back unchanged.

    Raises:
        CadyqError: a URI of another scheme, or a ``file://`` URI naming another host.
    """
    m = _URI.match(arg)
    if m is None:
        return arg
    if m.group(1).lower() != "file":
        raise CadyqError(f"{arg}: {m.group(1)}:// paths are not supported yet; use a folder every worker sees "
                         "(a shared filesystem), as a path or a file:// URI")
    parts = urlsplit(arg)
    if parts.netloc not in ("", "localhost"):
        raise CadyqError(f"{arg}: file:// URIs must name a local path (file:///path)")
    return unquote(parts.path) + ("/" if arg.endswith("/") and not parts.path.endswith("/") else "")
