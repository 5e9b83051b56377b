"""Start importing the compiled graph the previous run used while the program is still starting.

Importing a cached compiled graph takes ~0.25 s (about 3,000 compiled nodes), and the program needs
~0.3 s of Python start-up (imports, options, the model's file, the image) before it knows which graph
an image needs. ``import_model`` releases the GIL, so :func:`start` (called by :mod:`cadyq_cli.program` for
``upscale`` and ``bitmap``, before the command line's own imports) imports the graph named by the cache's
marker file (:data:`MARKER`, written by :func:`remember`: the first body graph each of the last
:data:`REQUESTS` requests prepared) names for this request (:func:`request_key`: command, graph options, image size)
on a second thread meanwhile. :func:`take` hands it
to the engine when the engine asks for that very file with that very configuration, and drops it
otherwise: the blob's bytes and the compile settings are the same either way, so is the output.
``CADYQ_PREFETCH=0`` turns it off.
"""
from __future__ import annotations

import json
import os
import threading
from contextlib import suppress
from pathlib import Path

__all__ = ["MARKER", "REQUESTS", "enabled", "request_key", "remember", "settle", "start", "take"]

#: file in the compiled-graph cache naming, for each of the last :data:`REQUESTS` requests (:func:`request_key`), the
#: first body graph it prepared and its compile settings, the most recent last
MARKER = "last-graph.json"
#: requests the marker remembers: a script that alternates a few kinds of job guesses right for each
REQUESTS = 8
#: options of ``upscale``/``bitmap`` that decide which graph an image runs on, and the flags (no value)
GRAPH_OPTIONS = ("--model", "--scale", "--mode", "--tiling", "--tile", "--overlap", "--region", "--threads", "--fp-layers")
FLAGS = ("--overwrite", "--skip-existing", "--recursive", "-r", "--quiet", "-q", "--debug")

_lock = threading.Lock()
_key: str | None = None  # this process's request (set by start), recorded by remember
_remembered = False  # the first body graph of the process is the one recorded: the one a rerun asks for first
_threads: list[threading.Thread] = []  # every prefetch thread started, until settle() has joined it
_pending: dict[str, object] = {}  # "path", "config", "thread" and "holder" (its "result") of this process's prefetch


def enabled() -> bool:
    """False under ``CADYQ_PREFETCH=0``."""
    return os.environ.get("CADYQ_PREFETCH", "") != "0"


def request_key(argv: list[str]) -> str | None:
    """What decides the graph of a command line ``cadyq upscale|bitmap IN ...``: the command, the graph options
    given (:data:`GRAPH_OPTIONS`), ``CADYQ_FREE_SIZE`` and the input image's size (read from its header); None
    when the input is not one image file (a folder, stdin) or its size cannot be read. A guess is only made for
    the same request as the run that left the marker: a wrong guess costs a core for ~0.25 s."""
    if len(argv) < 3:
        return None
    opts: dict[str, str] = {}
    positional: list[str] = []
    it = iter(argv[2:])
    for tok in it:
        if tok == "--":
            positional += list(it)
        elif tok.startswith("-") and tok != "-":
            name, eq, value = tok.partition("=")
            if not name.startswith("--") and len(name) > 2:  # bundled short flags (-qr)
                if any(f"-{c}" not in FLAGS for c in name[1:]):
                    return None
                continue
            if not eq and name not in FLAGS:
                value = next(it, "")
            if name in GRAPH_OPTIONS:
                opts[name] = value
        else:
            positional.append(tok)
    if not positional or not os.path.isfile(positional[0]):
        return None
    size = _png_size(positional[0])
    if size is None:
        try:
            import warnings

            from PIL import Image

            with warnings.catch_warnings():  # e.g. a decompression-bomb warning: the command reports what matters
                warnings.simplefilter("ignore")
                with Image.open(positional[0]) as im:  # the header only
                    size = im.size
        except Exception:  # noqa: BLE001 - not an image: the command says so itself
            return None
    return json.dumps([argv[1], sorted(opts.items()), os.environ.get("CADYQ_FREE_SIZE", ""), list(size)])


def _png_size(path: str) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk without importing Pillow (None: not a PNG)."""
    with suppress(OSError), open(path, "rb") as f:
        head = f.read(24)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None


def _requests(mark: Path) -> dict[str, dict[str, object]]:
    """The marker's requests, oldest first: key -> {"blob", "config"} (empty when it is missing or damaged; a damaged
    entry is skipped)."""
    try:
        data = json.loads(mark.read_text())
    except Exception:  # noqa: BLE001 - missing, unreadable, not JSON, nested too deep: no marker
        return {}
    entries = data.get("requests") if isinstance(data, dict) else None
    out: dict[str, dict[str, object]] = {}
    for r in entries if isinstance(entries, list) else []:
        if isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("blob"), str) \
                and isinstance(r.get("config"), dict):
            out[r["key"]] = {"blob": r["blob"], "config": dict(r["config"])}
    return out


def remember(path: Path, config: dict[str, object]) -> None:
    """Name ``path`` (a compiled graph in the cache folder) and its settings as the one to prefetch next time for
    this process's request (nothing without one: a library call), beside the other requests the marker holds (the
    :data:`REQUESTS` most recent). Only the process's first body graph counts: it is the one the same request asks
    for first (:func:`take`), whatever other tiles need later. Written atomically, and only when it changes.
    A cache that cannot be written is no cache: nothing raised."""
    global _remembered
    if _key is None or _remembered:
        return
    _remembered = True
    mark = path.parent / MARKER
    with suppress(Exception):  # an optimization only: never the command's failure
        requests = _requests(mark)
        entry = {"blob": path.name, "config": config}
        if list(requests)[-1:] == [_key] and requests[_key] == json.loads(json.dumps(entry)):
            return
        requests.pop(_key, None)
        requests[_key] = entry
        kept = list(requests.items())[-REQUESTS:]
        text = json.dumps({"requests": [{"key": k, **v} for k, v in kept]}, sort_keys=True)
        tmp = mark.with_name(f"{MARKER}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, mark)
        finally:
            tmp.unlink(missing_ok=True)


def start(folder: Path | None, key: str | None) -> bool:
    """Record ``key`` (:func:`request_key`) as this process's request and, when ``folder``'s marker names a graph
    prepared for this request, begin importing it on a daemon thread; True when one started."""
    global _key, _remembered
    if folder is None or key is None or not enabled() or _pending:
        return False
    _key, _remembered = key, False
    mark = _requests(folder / MARKER).get(key)
    if mark is None:
        return False
    try:
        path, config = folder / str(mark["blob"]), dict(mark["config"])  # type: ignore[call-overload]
        data = path.read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return False

    import openvino as ov  # here, not on the thread: Python-level imports on two threads take turns on the GIL

    holder: dict[str, object] = {}

    def run() -> None:
        try:
            holder["result"] = ov.Core().import_model(data, "CPU", config)
        except Exception:  # noqa: BLE001 - a stale or damaged blob: the engine imports or compiles its own
            holder["result"] = None

    thread = threading.Thread(target=run, name="cadyq-prefetch", daemon=True)
    _pending.update(path=path, config=config, thread=thread, holder=holder)
    _threads.append(thread)
    thread.start()
    return True


def settle() -> None:
    """Wait for any prefetch still importing and drop what it made. Call it before the interpreter shuts down
    normally: a thread still inside OpenVINO while Python finalizes crashed the process (exit 139, measured on a
    usage error right after start); ``os._exit`` needs no settling."""
    with _lock:
        _pending.clear()
        for thread in list(_threads):
            while thread.is_alive():
                try:
                    thread.join()
                except KeyboardInterrupt:  # at most the rest of one import (~0.25 s): never leave it running
                    continue
        _threads.clear()


def take(path: Path, config: dict[str, object]) -> object | None:
    """The prefetched compiled graph if it is ``path`` compiled with ``config`` (waits for the import to end),
    else None; either way the prefetch is over (a wrong guess is dropped)."""
    with _lock:
        if not _pending:
            return None
        same = _pending["path"] == path and _pending["config"] == dict(config)
        if same:
            _pending["thread"].join()  # type: ignore[attr-defined]
        result = _pending["holder"].get("result") if same else None  # type: ignore[attr-defined]
        _pending.clear()
        return result
