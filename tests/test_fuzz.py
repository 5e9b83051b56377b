"""Fuzzed inputs: hundreds of broken PNG, JPEG, WebP and TIFF files through ``cadyq upscale``.

Every mutant (bit flips, truncations, header and chunk corruption, PNG chunks re-signed with a
valid CRC so the decoder gets past its checksum; fixed seed) must be upscaled or refused with a
one-line error: never a traceback, a hang or a partial output, and the batch's JSON lines
account for every input. The local engine takes them all; the Ray engine a small subset, whose
per-file verdicts must equal the local engine's.
"""
from __future__ import annotations

import _thread
import io
import json
import logging
import os
import struct
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from cadyq_cli.cli import app

N_MUTANTS = 320
SEED = 20261203
STALL_S = 30.0  # hang detector: no image may take this long (tiny images take well under a second)


def _seeds(image_array: Callable[..., np.ndarray]) -> dict[str, bytes]:
    """Small valid files covering the decoders' main paths (modes, compressions, metadata)."""
    rgb, rgba = image_array(12, 10, 3, 1), image_array(12, 10, 4, 2)
    gray = image_array(12, 10, 1, 3)
    out = {}

    def save(name: str, im: Image.Image, **kw: object) -> None:
        buf = io.BytesIO()
        im.save(buf, **kw)
        out[name] = buf.getvalue()

    save("rgb.png", Image.fromarray(rgb), format="PNG")
    save("rgba.png", Image.fromarray(rgba, "RGBA"), format="PNG")
    save("pal.png", Image.fromarray(rgb).quantize(8), format="PNG", transparency=0)
    save("gray16.png", Image.fromarray(gray.astype(np.uint16) * 257), format="PNG")
    save("base.jpg", Image.fromarray(rgb), format="JPEG", quality=90)
    save("prog.jpg", Image.fromarray(rgb), format="JPEG", progressive=True, exif=Image.Exif().tobytes())
    save("lossy.webp", Image.fromarray(rgb), format="WEBP", quality=80)
    save("lossless.webp", Image.fromarray(rgba, "RGBA"), format="WEBP", lossless=True)
    save("raw.tif", Image.fromarray(rgb), format="TIFF")
    save("lzw.tif", Image.fromarray(gray, "L"), format="TIFF", compression="tiff_lzw")
    return out


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every PNG chunk."""
    pos, found = 8, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        found.append((pos, length))
        pos += 12 + length
    return found


def _structure_offsets(name: str, data: bytes) -> list[int]:
    """Offsets of length/size/offset fields and markers: where corruption hurts decoders most."""
    if name.endswith(".png"):
        return [p for pos, _ in _png_chunks(data) for p in (pos, pos + 4)] + [16, 20, 24]  # lengths, types, IHDR
    if name.endswith(".jpg"):
        return [i + 2 for i in range(len(data) - 3) if data[i] == 0xFF and data[i + 1] not in (0x00, 0xFF)]
    if name.endswith(".webp"):
        return [4, 12, 16, 20, 24, 26, 28]  # RIFF size, chunk type and size, VP8/VP8L header and dimensions
    (ifd,) = struct.unpack("<I", data[4:8])  # little-endian TIFF, as Pillow writes it
    return [4, ifd] + [ifd + 2 + 12 * k + d for k in range(8) for d in (0, 2, 4, 8)]


def _mutate(name: str, data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One mutant of ``data`` and the kind of mutation."""
    buf = bytearray(data)
    kind = ["flip", "flip", "truncate", "header", "structure", "resign"][rng.integers(6)]
    if kind == "resign" and not name.endswith(".png"):
        kind = "structure"
    if kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == "truncate":
        buf = buf[: int(rng.integers(1, len(buf)))]
    elif kind == "header":
        for i in rng.integers(0, min(32, len(buf)), size=int(rng.integers(1, 5))):
            buf[int(i)] = int(rng.integers(256))
    elif kind == "structure":
        offsets = [o for o in _structure_offsets(name, data) if o + 4 <= len(buf)]
        o = offsets[int(rng.integers(len(offsets)))]
        value = [0, 1, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, int(rng.integers(1 << 32))][rng.integers(6)]
        buf[o:o + 4] = struct.pack(">I", value)
    else:  # rewrite one PNG chunk's body (IHDR fields, palette, data) and fix its CRC
        chunks = _png_chunks(data)
        pos, length = chunks[int(rng.integers(len(chunks) - 1))]  # not IEND
        body = bytearray(buf[pos + 8:pos + 8 + length])
        if body:
            for _ in range(int(rng.integers(1, 4))):
                body[int(rng.integers(len(body)))] = int(rng.integers(256))
        buf[pos + 8:pos + 8 + length] = body
        buf[pos + 8 + length:pos + 12 + length] = struct.pack(">I", zlib.crc32(bytes(buf[pos + 4:pos + 8 + length])))
    return kind, bytes(buf)


def make_mutants(folder: Path, image_array: Callable[..., np.ndarray], n: int = N_MUTANTS,
                 seed: int = SEED) -> dict[str, str]:
    """Write ``n`` mutants (names ``mNNN_<kind>_<seed file>``) into ``folder``; returns name -> kind."""
    rng = np.random.default_rng(seed)
    seeds = sorted(_seeds(image_array).items())
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    for k in range(n):
        name, data = seeds[k % len(seeds)]
        kind, blob = _mutate(name, data, rng)
        out = f"m{k:03d}_{kind}_{name}"
        (folder / out).write_bytes(blob)
        kinds[out] = kind
    return kinds


@contextmanager
def _watchdog(progress: Callable[[], int], stall_s: float) -> Iterator[list[str]]:
    """Interrupt the main thread (KeyboardInterrupt: the CLI exits 130) when ``progress()`` stalls."""
    stalled: list[str] = []
    done = threading.Event()

    def watch() -> None:
        last, seen = progress(), 0.0
        while not done.wait(1.0):
            now = progress()
            seen = 0.0 if now != last else seen + 1.0
            last = now
            if seen >= stall_s:
                stalled.append(f"no image finished for {stall_s:.0f} s after {now} results")
                _thread.interrupt_main()
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield stalled
    finally:
        done.set()
        thread.join()


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


@contextmanager
def _fd2_text() -> Iterator[list[str]]:
    """What is written straight to file descriptor 2 (C libraries) inside the block."""
    text: list[str] = []
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as cap:
            os.dup2(cap.fileno(), 2)
            try:
                yield text
            finally:
                os.dup2(saved, 2)
                cap.seek(0)
                text.append(cap.read().decode("utf-8", "replace"))
    finally:
        os.close(saved)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _run(args: list[str], weights: Path, sink: Path, stall_s: float) -> Result:
    logged = _Records()
    logging.getLogger().addHandler(logged)
    try:
        with _watchdog(lambda: _count_lines(sink), stall_s) as stalled, warnings.catch_warnings(record=True) as caught, \
                _fd2_text() as raw:
            warnings.simplefilter("always")
            res = CliRunner().invoke(app, ["upscale", *args, "--weights", str(weights), "--scale", "2", "--threads", "1",
                                           "--max-pixels", "200000", "-q", "--json", str(sink)])
    finally:
        logging.getLogger().removeHandler(logged)
    assert not stalled, stalled
    assert not [r.getMessage() for r in logged.records if r.name.startswith("PIL")]  # would print raw to stderr
    # a decoder's Python warning reaches stderr as two raw lines (file:line, source), libtiff writes to
    # file descriptor 2 itself: neither may get past cadyq's one-line messages
    escaped = sorted({f"{w.category.__name__}: {w.message}" for w in caught if "PIL" in w.filename})
    assert not escaped, escaped[:5]
    assert "TIFF" not in raw[0], raw[0][:500]
    return res


def _check_batch(res: Result, src: Path, out: Path, sink: Path) -> dict[str, str | None]:
    """Everything the fuzz promises about one batch; returns input name -> error (None: upscaled)."""
    assert res.exit_code in (0, 1), (res.exit_code, res.stderr[-2000:], repr(res.exception))
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    inputs = {p.name for p in src.iterdir()}
    lines = [json.loads(ln) for ln in sink.read_text().splitlines()]
    verdicts = {Path(r["input"]).name: r.get("error") for r in lines}
    assert len(lines) == len(inputs) and set(verdicts) == inputs  # one line per input, none twice
    written = {p.name for p in out.iterdir()} if out.exists() else set()
    assert not [w for w in written if w.endswith(".tmp")], "temporary files left behind"
    for r in lines:
        name = Path(r["input"]).name
        if "error" in r:
            err = r["error"]
            assert err and "\n" not in err and name in err, r
            assert "internal error" not in err, r  # an unexpected exception, turned into a failure by the worker
            assert Path(r["output"]).name not in written, f"{name} failed but left an output"
        else:
            with Image.open(r["output"]) as im:
                im.load()  # decodes completely: no partial file
                assert im.size == (2 * r["width"], 2 * r["height"]), r
    failed = [e for e in verdicts.values() if e is not None]
    assert res.exit_code == (1 if failed else 0)
    listed = [ln for ln in res.stderr.splitlines() if ln.lstrip().startswith("✗")]
    assert len(listed) == len(failed)  # the failures, one line each, at the end
    return verdicts


@pytest.fixture(scope="module")
def mutants(tmp_path_factory: pytest.TempPathFactory, pattern: Callable[..., np.ndarray]) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("fuzz") / "in"
    return folder, make_mutants(folder, pattern)


@pytest.fixture(scope="module")
def local_verdicts(mutants: tuple[Path, dict[str, str]], weights_x2: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
    src, _ = mutants
    work = tmp_path_factory.mktemp("fuzz_local")
    res = _run([str(src), str(work / "out")], weights_x2, work / "lines.jsonl", STALL_S)
    return _check_batch(res, src, work / "out", work / "lines.jsonl")


def test_mutants_cover_every_format_and_kind(mutants: tuple[Path, dict[str, str]]) -> None:
    _, kinds = mutants
    assert len(kinds) >= 300
    for ext in (".png", ".jpg", ".webp", ".tif"):
        assert sum(name.endswith(ext) for name in kinds) >= 60
    assert set(kinds.values()) == {"flip", "truncate", "header", "structure", "resign"}


def test_local_engine_survives_the_fuzz(local_verdicts: dict[str, str | None]) -> None:
    ok = sum(v is None for v in local_verdicts.values())
    assert 0 < ok < len(local_verdicts)  # the mutants exercise both outcomes


def test_ray_engine_agrees_on_a_subset(ray_cluster: str, mutants: tuple[Path, dict[str, str]],
                                       local_verdicts: dict[str, str | None], weights_x2: Path, tmp_path: Path) -> None:
    src, _ = mutants
    subset = tmp_path / "in"
    subset.mkdir()
    names = sorted(local_verdicts)[::10]  # 32 files, every kind and format
    for name in names:
        (subset / name).write_bytes((src / name).read_bytes())
    res = _run([str(subset), str(tmp_path / "out"), "--engine", "ray", "--workers", "2"], weights_x2,
               tmp_path / "lines.jsonl", 4 * STALL_S)  # allows for the workers' start
    verdicts = _check_batch(res, subset, tmp_path / "out", tmp_path / "lines.jsonl")
    for name in names:
        local = local_verdicts[name]
        assert (verdicts[name] is None) == (local is None), name
        if local is not None:
            assert verdicts[name] == local.replace(str(src), str(subset)), name
