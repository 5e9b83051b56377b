"""Image reading and writing for the upscaler.

Array convention (used throughout cadyq): colour is an ``(H, W, 3)`` float32 RGB array on
the 0..255 scale, whatever the file's bit depth; 16-bit samples become ``value16 / 257``, so
they keep their full precision as fractional values and ``round(x * 257)`` gives them back.
Alpha, when present, is a separate ``(H, W)`` float32 array on 0..1. Grayscale inputs are
replicated to three channels and flagged with ``gray=True``. Pixels are always stored in
display orientation: the EXIF orientation is applied on reading and reset to 1.

Reading uses Pillow. Pillow decodes 16-bit colour PNG/TIFF to 8 bits, so those files are
decoded again with OpenCV to keep 16 bits. Writing is atomic: the file is encoded in memory,
written to a hidden temporary file next to the target, fsynced and renamed over it.
"""
from __future__ import annotations

import io
import logging
import os
import secrets
import struct
import tempfile
import threading
import warnings as _warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, features

from .errors import ImageReadError, ImageTooLargeError, ImageWriteError
from .samples import round_into

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PNG_LEVEL",
    "check_png_level",
    "OUTPUT_FORMATS",
    "INPUT_EXTENSIONS",
    "LoadedImage",
    "read_image",
    "encode_image",
    "write_image",
    "temp_files",
]

DEFAULT_MAX_PIXELS = 64_000_000
"""Default limit on the declared width * height of an input image (decompression bombs)."""

PNG_LEVEL = 4
"""Default zlib level of PNG outputs (0-9; Pillow's and libpng's usual default is 6). Measured on a 1280x960 x4
output with the encoder PNGs are written with (libpng through imagecodecs): level 4 encodes in 0.25x the time of
level 6 (0.071 s against 0.284 s) for a file 5.7 % larger; 9 is 5x slower than 6 for 3 % smaller
(``python bench/startup.py png OUT.png``, which also times Pillow's encoder: 0.115 s at level 4)."""


def check_png_level(level: int) -> int:
    """``level`` as a zlib level of PNG output; ValueError outside 0..9."""
    if not 0 <= int(level) <= 9:
        raise ValueError(f"png_level must be in 0..9, got {level}")
    return int(level)


#: File extensions of the images cadyq reads (upscale, eval and training folders alike).
INPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")

OUTPUT_FORMATS: dict[str, str] = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP",
    ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP",
}
"""Output file extension (lower case) -> format written."""

# Formats Pillow may open. Restricting the list keeps plugins that shell out to external
# programs (EPS -> Ghostscript) or are rarely safe to expose out of reach.
_INPUT_FORMATS = (
    "PNG", "JPEG", "MPO", "WEBP", "TIFF", "BMP", "DIB", "GIF", "PPM", "TGA", "ICO",
    "JPEG2000", "QOI", "SGI", "PCX", "AVIF",
)
_EXIF_HEADER = b"Exif\x00\x00"
_ORIENTATION = 0x0112
_PILLOW_LOCK = threading.Lock()


@dataclass
class LoadedImage:
    """A decoded image plus what is needed to write the result back faithfully.

    Attributes:
        rgb: (H, W, 3) float32 RGB on 0..255 (16-bit inputs: ``value16 / 257``).
        alpha: (H, W) float32 alpha on 0..1, or None when the image has no transparency.
        gray: the input was grayscale (1-bit, L, LA, 16-bit gray); ``rgb`` has three equal
            channels.
        bit_depth: 8 or 16 bits per sample in the input.
        icc_profile: the embedded ICC profile, or None (CMYK inputs are converted to sRGB and
            get None).
        exif: the EXIF block (starting with ``b"Exif\\0\\0"``) with orientation reset to 1,
            or None. TIFF tags are not carried as EXIF.
        format: Pillow's format name (``"PNG"``, ``"JPEG"``, ...).
        path: the file read.
        n_frames: number of frames or pages; only the first is decoded.
        warnings: one-line notes about anything lost or approximated while reading.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    gray: bool
    bit_depth: int
    icc_profile: bytes | None
    exif: bytes | None
    format: str
    path: Path
    n_frames: int = 1
    warnings: list[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        """Height in pixels (after orientation)."""
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        """Width in pixels (after orientation)."""
        return int(self.rgb.shape[1])


def _one_line(text: object) -> str:
    """Collapse any message onto one line."""
    return " ".join(str(text).split())


def _describe_exc(exc: BaseException) -> str:
    """Short one-line reason for an exception raised by a decoder or the OS."""
    if isinstance(exc, OSError) and exc.strerror:
        return _one_line(exc.strerror).lower()
    return _one_line(exc) or type(exc).__name__


@contextmanager
def _pillow_settings() -> Iterator[tuple[list[_warnings.WarningMessage], list[str]]]:
    """Strict Pillow globals for one read: no truncated images, no Pillow bomb limit.

    Our own ``max_pixels`` check replaces Pillow's (so that ``None`` really disables it).
    The globals are restored afterwards; a lock serialises cadyq's own readers. Yields the
    decoders' Python warnings (e.g. corrupt EXIF) and Pillow's log messages (warning and up),
    caught as they happen instead of reaching stderr raw (:func:`_notes` makes one-liners).
    """
    with _PILLOW_LOCK:
        old_trunc, old_max = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        Image.MAX_IMAGE_PIXELS = None
        logs: list[str] = []
        handler = _ListHandler(logs)
        pil_log = logging.getLogger("PIL")
        old_propagate = pil_log.propagate
        pil_log.addHandler(handler)
        pil_log.propagate = False
        try:
            with _warnings.catch_warnings(record=True) as caught:
                _warnings.simplefilter("always")
                _warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield caught, logs
        finally:
            pil_log.removeHandler(handler)
            pil_log.propagate = old_propagate
            ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = old_trunc, old_max


class _ListHandler(logging.Handler):
    """Collects log messages (warning and up) as one-line strings."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102
        with suppress(Exception):
            self.sink.append(_one_line(record.getMessage()))


def _notes(caught: list[_warnings.WarningMessage], logs: list[str], c_notes: list[str]) -> list[str]:
    """One-line warnings from the decoders' Python warnings, Pillow's log and libtiff (deduplicated)."""
    notes = [f"decoder: {_one_line(w.message)}" for w in caught] + [f"decoder: {m[:160]}" for m in logs]
    return list(dict.fromkeys(notes + [f"libtiff: {n[:160]}" for n in c_notes]))[:4]


@contextmanager
def _fd2_captured(active: bool = True) -> Iterator[list[str]]:
    """Collect what C libraries (libtiff) print straight to file descriptor 2, one line each.

    The yielded list is filled when the block ends (also when it raises).
    """
    lines: list[str] = []
    if not active:
        yield lines
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to protect
        yield lines
        return
    try:
        with tempfile.TemporaryFile() as cap:
            os.dup2(cap.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                cap.seek(0)
                for raw in cap.read(1 << 16).decode("utf-8", "replace").splitlines():
                    if raw.strip() and _one_line(raw) not in lines:
                        lines.append(_one_line(raw))
    finally:
        os.close(saved)


def _allowed_formats(head: bytes = b"") -> list[str]:
    """Formats Pillow may open: a PNG (by its signature ``head``) needs only the PNG plugin, which
    spares loading all of Pillow's plugins (about 20 ms) for the most common input."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ["PNG"]
    Image.init()
    return [f for f in _INPUT_FORMATS if f in Image.OPEN]


def _head(path: Path, data: bytes | None) -> bytes:
    """The first bytes of the file (b"" when they cannot be read: the open then says why)."""
    if data is not None:
        return data[:8]
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError:
        return b""


def _reset_exif_orientation(raw: bytes) -> bytes | None:
    """Return ``raw`` with the ``Exif\\0\\0`` header and IFD0 orientation set to 1.

    The block is patched in place rather than re-serialised, so maker notes and sub-IFDs stay
    byte-identical. Returns None when the block is not a parseable TIFF structure.
    """
    tiff = bytearray(raw[len(_EXIF_HEADER):] if raw.startswith(_EXIF_HEADER) else raw)
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    if order is None:
        return None
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(count):
            entry = ifd + 2 + 12 * i
            tag, typ, n = struct.unpack_from(order + "HHI", tiff, entry)
            if tag == _ORIENTATION and typ == 3 and n == 1:  # SHORT, value left-justified
                struct.pack_into(order + "H", tiff, entry + 8, 1)
                break
    except struct.error:
        return None
    return _EXIF_HEADER + bytes(tiff)


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an (H, W, ...) array, as Pillow's exif_transpose."""
    if orientation == 2:
        arr = arr[:, ::-1]
    elif orientation == 3:
        arr = arr[::-1, ::-1]
    elif orientation == 4:
        arr = arr[::-1]
    elif orientation == 5:
        arr = arr.swapaxes(0, 1)
    elif orientation == 6:
        arr = np.rot90(arr, k=-1)
    elif orientation == 7:
        arr = arr.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        arr = np.rot90(arr, k=1)
    return np.ascontiguousarray(arr)


def _tile_rawmodes(im: Image.Image) -> list[str]:
    """Raw modes of the image's tiles (e.g. ``"RGB;16B"``), before decoding."""
    modes = []
    for tile in getattr(im, "tile", None) or []:
        args = tile.args if hasattr(tile, "args") else tile[3]
        raw = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
        if isinstance(raw, str):
            modes.append(raw)
    return modes


def _read_16bit_colour(path: Path, raw: bytes | None = None) -> np.ndarray:
    """Decode a 16-bit colour PNG/TIFF (the file, or ``raw`` bytes) with OpenCV: (H, W, C) uint16, RGB(A)."""
    import cv2  # local: only this path needs it

    try:
        data = np.fromfile(path, dtype=np.uint8) if raw is None else np.frombuffer(raw, dtype=np.uint8)
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)  # UNCHANGED also ignores EXIF orientation
    except (OSError, cv2.error) as exc:
        raise ImageReadError(f"cannot read {path}: 16-bit decoding failed ({_describe_exc(exc)})") from exc
    if arr is None or arr.dtype != np.uint16:
        raise ImageReadError(f"cannot read {path}: 16-bit colour data could not be decoded")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] >= 3:
        arr = np.concatenate([arr[:, :, 2::-1], arr[:, :, 3:]], axis=2)  # BGR(A) -> RGB(A)
    return arr


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None, warnings: list[str]) -> Image.Image:
    """CMYK -> sRGB through the embedded profile when there is one, else Pillow's formula."""
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            warnings.append(f"embedded CMYK profile unusable ({_describe_exc(exc)}); used a naive CMYK->RGB conversion")
    return im.convert("RGB")


def read_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS, data: bytes | None = None
) -> LoadedImage:
    """Read an image file into the float RGB(+alpha) convention of this module.

    Args:
        path: image file (PNG, JPEG, WebP, TIFF, BMP, GIF, ...).
        max_pixels: refuse images whose declared width * height exceeds this, before any
            pixel is decoded (decompression-bomb protection); None disables the check.
        data: the file's bytes (e.g. read from stdin); ``path`` then only names it in messages.

    Returns:
        The decoded image and its metadata.

    Raises:
        ImageTooLargeError: the image declares more than ``max_pixels`` pixels.
        ImageReadError: the file is missing, empty, truncated, corrupt or not an image.
    """
    path = Path(path)
    try:
        if data is not None:
            if not data:
                raise ImageReadError(f"cannot read {path}: no data")
        elif path.is_dir():
            raise ImageReadError(f"cannot read {path}: it is a directory")
        elif path.stat().st_size == 0:
            raise ImageReadError(f"cannot read {path}: file is empty")
    except FileNotFoundError as exc:
        raise ImageReadError(f"cannot read {path}: file not found") from exc
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {_describe_exc(exc)}") from exc

    warnings: list[str] = []
    c_notes: list[str] = []
    with _pillow_settings() as (caught, logs):
        try:
            im = Image.open(path if data is None else io.BytesIO(data), formats=_allowed_formats(_head(path, data)))
        except Image.UnidentifiedImageError as exc:
            raise ImageReadError(f"cannot read {path}: not an image in a supported format") from exc
        except Exception as exc:  # Pillow plugins raise many types on malformed headers
            raise ImageReadError(f"cannot read {path}: {_describe_exc(exc)}") from exc
        with im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(
                    f"cannot read {path}: image is {width}x{height} = {width * height:,} pixels, "
                    f"above the limit of {max_pixels:,}; raise it with --max-pixels"
                )
            fmt = im.format or "unknown"
            try:
                n_frames = int(getattr(im, "n_frames", 1))
                if n_frames > 1:
                    im.seek(0)
                    if fmt != "MPO":  # MPO: JPEG with extra previews / depth maps
                        warnings.append(f"{path.name} has {n_frames} frames; only the first is used")
                rawmodes = _tile_rawmodes(im)
                with _fd2_captured(fmt == "TIFF") as c_notes:  # libtiff reports on fd 2
                    im.load()  # decodes (and validates) the whole frame
                icc = im.info.get("icc_profile") or None
                exif_src = im.info.get("exif")
                if exif_src is None and fmt not in ("TIFF", "MPO") and im.getexif():
                    exif_src = im.getexif().tobytes()
                orientation = int(im.getexif().get(_ORIENTATION, 1) or 1)
                mode = im.mode
                # Pillow opens 16-bit RGB(A) and gray+alpha (as RGBA) but decodes them to 8 bits.
                wide = mode in ("RGB", "RGBA", "LA") and any(";16" in r for r in rawmodes)
                wide_gray = wide and all(r.startswith("LA") for r in rawmodes)
                if not wide:
                    im = ImageOps.exif_transpose(im)
            except ImageReadError:
                raise
            except Exception as exc:
                reason = _describe_exc(exc)
                if c_notes:
                    reason += f" (libtiff: {c_notes[-1][:160]})"
                if isinstance(exc, EOFError) or "truncated" in reason.lower():
                    detail = reason.removeprefix("image file is truncated").strip(" ()")
                    reason = "file is truncated" + (f" ({detail})" if detail else "")
                raise ImageReadError(f"cannot read {path}: {reason}") from exc

            exif = _reset_exif_orientation(exif_src) if exif_src else None
            if exif_src and exif is None:
                warnings.append("EXIF block could not be parsed and was dropped")

            if wide:
                arr = _orient(_read_16bit_colour(path, data), orientation)
                if arr.shape[:2] != (im.height, im.width)[:: 1 if orientation < 5 else -1]:
                    raise ImageReadError(f"cannot read {path}: 16-bit decoder disagrees about the image size")
                gray = wide_gray
                colour = arr[:, :, :1] if gray else arr[:, :, :3]
                rgb = np.repeat(colour, 3, axis=2) if gray else colour
                alpha = arr[:, :, -1] if arr.shape[2] in (2, 4) else None
                return LoadedImage(
                    rgb=rgb.astype(np.float32) / np.float32(257.0),
                    alpha=None if alpha is None else alpha.astype(np.float32) / np.float32(65535.0),
                    gray=gray, bit_depth=16, icc_profile=icc, exif=exif, format=fmt, path=path,
                    n_frames=n_frames, warnings=warnings + _notes(caught, logs, c_notes),
                )

            rgb, alpha, gray, bit_depth, icc = _pillow_to_arrays(im, path, icc, warnings)
    return LoadedImage(rgb=rgb, alpha=alpha, gray=gray, bit_depth=bit_depth, icc_profile=icc, exif=exif,
                       format=fmt, path=path, n_frames=n_frames, warnings=warnings + _notes(caught, logs, c_notes))


def _pillow_to_arrays(
    im: Image.Image, path: Path, icc: bytes | None, warnings: list[str]
) -> tuple[np.ndarray, np.ndarray | None, bool, int, bytes | None]:
    """Convert a decoded, oriented Pillow image to (rgb, alpha, gray, bit_depth, icc)."""
    mode = im.mode
    transparent = im.has_transparency_data
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S"):
        raw = np.asarray(im)
        values = np.clip(raw, 0, 65535).astype(np.float32)
        alpha = None
        trns = im.info.get("transparency")
        if isinstance(trns, int):
            alpha = (raw != trns).astype(np.float32)
        gray = np.repeat((values / np.float32(257.0))[:, :, None], 3, axis=2)
        return gray, alpha, True, 16, icc
    if mode == "F":
        raise ImageReadError(f"cannot read {path}: 32-bit floating-point images are not supported")
    if mode == "CMYK":
        im = _cmyk_to_rgb(im, icc, warnings)
        icc, mode = None, "RGB"
    if mode in ("1", "L", "LA", "La"):
        gray = True
        im = im.convert("LA") if (mode in ("LA", "La") or transparent) else im.convert("L")
    else:
        gray = False
        keep_alpha = transparent or mode in ("RGBA", "RGBa", "PA", "LA", "La")
        try:
            im = im.convert("RGBA" if keep_alpha else "RGB")
        except (ValueError, OSError) as exc:
            raise ImageReadError(f"cannot read {path}: unsupported image mode {mode}") from exc
    arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    n_colour = 1 if gray else 3
    colour = arr[:, :, :n_colour].astype(np.float32)
    rgb = np.repeat(colour, 3, axis=2) if gray else colour
    alpha = arr[:, :, n_colour].astype(np.float32) / np.float32(255.0) if arr.shape[2] > n_colour else None
    return np.ascontiguousarray(rgb), alpha, gray, 8, icc


# --------------------------------------------------------------------------- writing


def _quantize(values: np.ndarray, bit_depth: int, scale: float) -> np.ndarray:
    """Clamp and round float samples (H, W[, C]) to uint8/uint16 (:func:`~cadyq_cli.samples.round_into`);
    ``scale`` maps them to 0..max. Samples that already have the target integer type (``scale`` 1) pass through."""
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    values = np.asarray(values)
    if values.dtype == dtype and scale == 1.0:
        return np.ascontiguousarray(values)
    return round_into(values, np.empty(values.shape, dtype), 255 if bit_depth == 8 else 65535, scale)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _splice_after_ihdr(png: bytes, chunks: bytes) -> bytes:
    """``png`` with ``chunks`` inserted right after IHDR."""
    end = 8 + 8 + 13 + 4  # signature, then IHDR: length and type, 13 data bytes, CRC
    assert png[12:16] == b"IHDR", "an encoder's PNG starts with IHDR"
    return b"".join((png[:end], chunks, memoryview(png)[end:]))  # one copy of the file, not two


def _encode_png(arr: np.ndarray, icc: bytes | None, exif: bytes | None, level: int = PNG_LEVEL) -> bytes:
    """Encode (H, W, C) uint8 or uint16, C in 1..4 (gray, gray+alpha, RGB, RGBA), as a PNG of that bit depth.

    libpng (through imagecodecs) encodes the pixels: at level 4 it takes 0.6x the time of Pillow's encoder on a
    1280x960 x4 output for a file 1.7 % larger (``python bench/startup.py png OUT.png``). iCCP and eXIf chunks
    (which it does not write) are spliced in after IHDR."""
    try:
        from imagecodecs import PngError, png_encode  # ~6 ms: its extension loads on first use
    except ImportError as exc:  # a declared dependency; a broken install gets one line, not a traceback
        raise OSError(f"PNG output needs the imagecodecs package (pip install imagecodecs): {exc}") from None
    try:
        png = png_encode(np.ascontiguousarray(arr[:, :, 0] if arr.shape[2] == 1 else arr), level=level)
    except PngError as exc:
        raise OSError(str(exc)) from exc
    extra = b""
    if icc:
        extra += _png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc))
    if exif:
        extra += _png_chunk(b"eXIf", exif[len(_EXIF_HEADER):] if exif.startswith(_EXIF_HEADER) else exif)
    return _splice_after_ihdr(png, extra) if extra else png


def _encode_tiff16(arr: np.ndarray, icc: bytes | None) -> bytes:
    """Encode (H, W, C) uint16 (gray, RGB, RGBA) as a 16-bit TIFF: tifffile, Deflate with the
    horizontal predictor, strips of about 256 KiB, unassociated alpha, the ICC profile embedded."""
    import tifffile

    h, w, c = arr.shape
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, arr[:, :, 0] if c == 1 else arr, photometric="minisblack" if c == 1 else "rgb",
        compression="zlib", compressionargs={"level": 6}, predictor=True,
        rowsperstrip=max(1, (1 << 18) // (w * c * 2)), extrasamples=["unassalpha"] if c == 4 else None,
        iccprofile=icc or None, metadata=None,
    )
    return buf.getvalue()


def _encode(
    fmt: str, colour: np.ndarray, alpha: np.ndarray | None, bit_depth: int,
    icc: bytes | None, exif: bytes | None, quality: int, warnings: list[str], png_level: int = PNG_LEVEL,
) -> bytes:
    """Encode arrays to file bytes in ``fmt``; appends notes about dropped data to ``warnings``."""
    if bit_depth == 16 and fmt not in ("PNG", "TIFF"):
        warnings.append(f"{fmt} cannot hold 16 bits per sample; wrote 8 bits")
        bit_depth = 8
    if alpha is not None and fmt in ("JPEG", "BMP"):
        warnings.append(f"{fmt} cannot hold transparency; alpha channel dropped")
        alpha = None
    if bit_depth == 16 and fmt == "TIFF" and colour.shape[2] == 1 and alpha is not None:
        colour = np.repeat(colour, 3, axis=2)  # Pillow cannot read 16-bit gray+alpha TIFF
    stored_gray = colour.shape[2] == 1 and fmt != "WEBP"
    if icc and len(icc) >= 20 and icc[16:20] != (b"GRAY" if stored_gray else b"RGB "):
        space = icc[16:20].decode("latin-1").strip()
        warnings.append(f"ICC profile ({space}) does not fit a {'gray' if stored_gray else 'RGB'} image; not embedded")
        icc = None
    scale = 257.0 if bit_depth == 16 else 1.0
    planes = [_quantize(colour, bit_depth, scale)]
    if alpha is not None:
        planes.append(_quantize(alpha, bit_depth, 255.0 if bit_depth == 8 else 65535.0)[:, :, None])
    arr = np.concatenate(planes, axis=2) if len(planes) > 1 else planes[0]

    if fmt == "PNG":
        return _encode_png(arr, icc, exif, png_level)
    if bit_depth == 16:
        if exif:
            warnings.append("EXIF is not written to 16-bit TIFF")
        return _encode_tiff16(arr, icc)

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    im = Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode=mode)
    options: dict[str, object] = {}
    if icc and fmt != "BMP":
        options["icc_profile"] = icc
    if exif and fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        options["exif"] = exif
    if fmt == "JPEG":
        options.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "WEBP":
        options.update(quality=quality, method=4)
    elif fmt == "TIFF" and features.check("libtiff"):
        options["compression"] = "tiff_deflate"
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory so that a rename is durable (POSIX only)."""
    if os.name != "posix":
        return
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_path(path: Path, token: str) -> Path:
    return path.parent / f".{path.name[:200]}.{token}.tmp"


def temp_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Temporary files that interrupted :func:`write_image` calls of ``paths`` left behind.

    Only a process killed outright (SIGKILL, power loss) leaves one; a batch engine whose
    workers can be killed removes them once no worker writes those paths any more. Each
    folder is listed once.
    """
    by_folder: dict[Path, set[str]] = {}
    for p in map(Path, paths):
        by_folder.setdefault(p.parent, set()).add(_temp_path(p, "").name[: -len(".tmp")])
    found = []
    for folder, heads in by_folder.items():
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for n in names:  # ".{name}.{8 hex}.tmp"
            token = n[-12:-4]
            if n.endswith(".tmp") and n[:-12] in heads and len(token) == 8 and all(c in "0123456789abcdef" for c in token):
                found.append(folder / n)
    return found


def _atomic_write(path: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to ``path`` through a hidden temp file in the same directory."""
    parent = path.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = _temp_path(path, secrets.token_hex(4))
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for a normal file
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise ImageWriteError(f"cannot write {path}: {_describe_exc(exc)}") from exc
    else:
        raise ImageWriteError(f"cannot write {path}: could not create a temporary file")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails atomically if the target appeared meanwhile
            except FileExistsError:
                raise ImageWriteError(f"cannot write {path}: file exists (allow overwriting to replace it)") from None
            except OSError:  # hard links unsupported here: check, then rename
                if os.path.lexists(path):
                    raise ImageWriteError(f"cannot write {path}: file exists (allow overwriting to replace it)") from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException as exc:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ImageWriteError(f"cannot write {path}: {_describe_exc(exc)}") from exc
        raise
    _fsync_dir(parent)


def _format_of(path: Path) -> str:
    """Output format for ``path``'s extension; ImageWriteError listing the known ones otherwise."""
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = " ".join(sorted(OUTPUT_FORMATS))
        raise ImageWriteError(f"cannot write {path}: unknown extension {path.suffix or '(none)'!r}; use one of {known}")
    return fmt


def encode_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    gray: bool = False,
    bit_depth: int = 8,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    quality: int = 95,
    png_level: int = PNG_LEVEL,
) -> tuple[bytes, list[str]]:
    """The bytes :func:`write_image` would write to ``path`` (whose extension picks the format).

    Nothing is written: this serves outputs that are not files (``-`` for stdout). Arguments,
    warnings and errors are those of :func:`write_image`.
    """
    path = Path(path)
    fmt = _format_of(path)
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    png_level = check_png_level(png_level)
    rgb = np.asarray(rgb)
    if gray and rgb.ndim == 2:
        rgb = rgb[:, :, None]
    if rgb.ndim != 3 or rgb.shape[2] not in ((1, 3) if gray else (3,)) or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"rgb must be a non-empty (H, W, 3) array, got shape {rgb.shape}")
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.ndim == 3 and alpha.shape[2] == 1:
            alpha = alpha[:, :, 0]
        if alpha.shape != rgb.shape[:2]:
            raise ValueError(f"alpha shape {alpha.shape} does not match image size {rgb.shape[:2]}")
    colour = rgb if rgb.dtype == np.uint8 and bit_depth == 8 else rgb.astype(np.float32, copy=False)
    if gray and colour.shape[2] == 3:
        colour = colour.mean(axis=2, keepdims=True, dtype=np.float32)
    warnings: list[str] = []
    try:
        data = _encode(fmt, colour, alpha, bit_depth, icc_profile, exif, int(quality), warnings, png_level)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageWriteError(f"cannot write {path}: {fmt} encoding failed ({_describe_exc(exc)})") from exc
    return data, warnings


def write_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    gray: bool = False,
    bit_depth: int = 8,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    quality: int = 95,
    png_level: int = PNG_LEVEL,
    overwrite: bool = False,
) -> list[str]:
    """Write an image atomically; the format follows the extension.

    Args:
        path: output file; its extension (``.png .jpg .jpeg .webp .tif .tiff .bmp``) picks the
            format. The parent directory must exist.
        rgb: (H, W, 3) float RGB on 0..255 (clamped, rounded half to even), or uint8 samples
            written as they are (8-bit output). With ``gray`` a (H, W) or (H, W, 1) array is
            accepted too; three channels are averaged.
        alpha: optional (H, W) alpha on 0..1. Dropped (with a warning) for JPEG and BMP.
        gray: write a single-channel image (plus alpha when given); WebP, and 16-bit TIFF
            with alpha, store it as RGB(A).
        bit_depth: 8, or 16 for PNG and TIFF (``value * 257``); other formats fall back to 8
            with a warning.
        icc_profile: ICC profile to embed (PNG, JPEG, WebP, TIFF); skipped with a warning when
            its colour space (GRAY / RGB) does not match the stored image.
        exif: EXIF block to embed (PNG, JPEG, WebP, 8-bit TIFF); pass the one from
            ``LoadedImage`` whose orientation is already 1.
        quality: JPEG/WebP quality, 1..100 (JPEG uses 4:4:4 chroma from 90 up).
        png_level: zlib level of PNG output, 0..9 (default :data:`PNG_LEVEL`).
        overwrite: replace an existing file.

    Returns:
        One-line warnings about data the format could not hold (empty when nothing was lost).

    Raises:
        ImageWriteError: unknown extension, missing parent directory, existing file without
            ``overwrite``, or any encoding/OS failure. No partial file is left behind.
        ValueError: inconsistent arguments (array shapes, ``bit_depth``, ``quality``, ``png_level``).
    """
    path = Path(path)
    _format_of(path)
    parent = path.parent
    if not parent.exists():
        raise ImageWriteError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ImageWriteError(f"cannot write {path}: {parent} is not a directory")
    if path.is_dir():
        raise ImageWriteError(f"cannot write {path}: it is a directory")
    if not overwrite and os.path.lexists(path):
        raise ImageWriteError(f"cannot write {path}: file exists (allow overwriting to replace it)")
    data, warnings = encode_image(path, rgb, alpha=alpha, gray=gray, bit_depth=bit_depth, icc_profile=icc_profile,
                                  exif=exif, quality=quality, png_level=png_level)
    _atomic_write(path, data, overwrite)
    return warnings
