"""Tests for cadyq_cli.io: reading/writing images, metadata, 16 bits, errors, atomicity."""
from __future__ import annotations

import logging
import os
import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile

from cadyq_cli import io as cio
from cadyq_cli.errors import CadyqError, ImageReadError, ImageTooLargeError, ImageWriteError
from cadyq_cli.io import LoadedImage, read_image, write_image

RNG = np.random.default_rng(1234)


def _smooth_rgb(h: int = 24, w: int = 32) -> np.ndarray:
    """A smooth uint8 RGB test image (compresses well, lossy codecs stay close)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], axis=2).astype(np.uint8)


def _open(path: Path) -> Image.Image:
    """Open, decode and close an image file (no dangling file handles)."""
    with Image.open(path) as im:
        im.load()
    return im


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _assert_one_line(exc: CadyqError, path: Path) -> None:
    msg = str(exc)
    assert "\n" not in msg and str(path) in msg, msg


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext,tol", [(".png", 0), (".tif", 0), (".bmp", 0), (".jpg", 6.0), (".webp", 6.0)])
def test_rgb_round_trip(tmp_path: Path, ext: str, tol: float) -> None:
    src = _smooth_rgb()
    p = tmp_path / f"in{ext}"
    Image.fromarray(src).save(p, quality=95)
    img = read_image(p)
    assert isinstance(img, LoadedImage)
    assert img.rgb.shape == (24, 32, 3) and img.rgb.dtype == np.float32
    assert img.alpha is None and not img.gray and img.bit_depth == 8 and img.n_frames == 1
    if tol:
        assert np.abs(img.rgb - src).mean() <= tol
    else:
        assert np.array_equal(img.rgb, src)

    out = tmp_path / f"out{ext}"
    assert write_image(out, img.rgb) == []
    back = np.asarray(_open(out).convert("RGB")).astype(np.float32)
    if tol:
        assert np.abs(back - src).mean() <= 2 * tol
    else:
        assert np.array_equal(back, src)


@pytest.mark.parametrize("ext", [".png", ".tif", ".webp"])
def test_rgba_alpha_preserved(tmp_path: Path, ext: str) -> None:
    src = np.dstack([_smooth_rgb(), np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1))])
    p = tmp_path / f"in{ext}"
    Image.fromarray(src, "RGBA").save(p, lossless=True)
    img = read_image(p)
    assert img.alpha is not None and img.alpha.shape == (24, 32) and img.alpha.dtype == np.float32
    assert np.allclose(img.alpha * 255, src[:, :, 3], atol=1e-3)
    out = tmp_path / f"out{ext}"
    write_image(out, img.rgb, alpha=img.alpha)
    back = _open(out)
    assert back.mode == "RGBA"
    if ext != ".webp":
        assert np.array_equal(np.asarray(back), src)


def test_palette_transparency_becomes_alpha(tmp_path: Path) -> None:
    p = tmp_path / "pal.png"
    im = Image.new("P", (4, 3), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.save(p, transparency=1)
    img = read_image(p)
    assert not img.gray and img.alpha is not None
    assert img.alpha[1, 1] == 0.0 and img.alpha[0, 0] == 1.0
    assert tuple(img.rgb[0, 0]) == (255, 0, 0)


def test_la_gray_with_alpha(tmp_path: Path) -> None:
    p = tmp_path / "la.png"
    lum = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    alpha = np.full((3, 4), 128, np.uint8)
    Image.fromarray(np.dstack([lum, alpha]), "LA").save(p)
    img = read_image(p)
    assert img.gray and img.bit_depth == 8
    assert np.array_equal(img.rgb, np.repeat(lum[:, :, None], 3, axis=2))
    assert np.allclose(img.alpha, 128 / 255)
    out = tmp_path / "la_out.png"
    write_image(out, img.rgb, alpha=img.alpha, gray=True)
    back = _open(out)
    assert back.mode == "LA" and np.array_equal(np.asarray(back), np.dstack([lum, alpha]))


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_in_and_single_channel_out(tmp_path: Path, mode: str) -> None:
    lum = (np.arange(20, dtype=np.uint8).reshape(4, 5) * 12)
    p = tmp_path / "g.png"
    Image.fromarray(lum, "L").convert(mode).save(p)
    img = read_image(p)
    assert img.gray and img.alpha is None and img.bit_depth == 8
    assert np.array_equal(img.rgb[..., 0], img.rgb[..., 2])
    for ext in (".png", ".jpg", ".tif", ".bmp"):
        out = tmp_path / f"g_out{ext}"
        write_image(out, img.rgb, gray=True)
        assert _open(out).mode == "L", ext
    assert np.array_equal(np.asarray(_open(tmp_path / "g_out.png")), img.rgb[..., 0].astype(np.uint8))


# --------------------------------------------------------------------------- 16 bits


def test_16bit_gray_png(tmp_path: Path) -> None:
    vals = np.array([[0, 1000, 1001], [32768, 65534, 65535]], np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(vals).save(p)  # Pillow mode I;16
    img = read_image(p)
    assert img.gray and img.bit_depth == 16
    assert np.array_equal(np.rint(img.rgb[..., 1] * 257).astype(np.uint16), vals)
    assert img.rgb[0, 1, 0] != img.rgb[0, 2, 0]  # 1000 and 1001 differ: not truncated to 8 bits
    out = tmp_path / "g16_out.png"
    write_image(out, img.rgb, gray=True, bit_depth=16)
    back = _open(out)
    assert back.mode == "I;16" and np.array_equal(np.asarray(back), vals)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_rgb_in_and_out(tmp_path: Path, ext: str) -> None:
    vals = RNG.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    vals[0, 0] = (1000, 1001, 65535)
    p = tmp_path / f"rgb16{ext}"
    assert cv2.imwrite(str(p), vals[:, :, ::-1])  # Pillow cannot write 16-bit RGB; OpenCV can
    assert _open(p).mode == "RGB"  # ...and Pillow alone would decode it to 8 bits
    img = read_image(p)
    assert not img.gray and img.bit_depth == 16 and img.alpha is None
    assert np.array_equal(np.rint(img.rgb * 257).astype(np.uint16), vals)
    assert img.rgb[0, 0, 0] != img.rgb[0, 0, 1]

    icc = _srgb_icc()
    for out_ext in (".png", ".tif"):
        out = tmp_path / f"out16{out_ext}"
        assert write_image(out, img.rgb, bit_depth=16, icc_profile=icc) == []
        assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED)[:, :, ::-1], vals)
        again = read_image(out)
        assert again.bit_depth == 16 and again.icc_profile == icc
        assert np.array_equal(np.rint(again.rgb * 257).astype(np.uint16), vals)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_rgba_and_gray_alpha_round_trip(tmp_path: Path, ext: str) -> None:
    vals = RNG.integers(0, 65536, (4, 5, 4), dtype=np.uint16)
    rgb, alpha = vals[..., :3].astype(np.float32) / 257, vals[..., 3].astype(np.float32) / 65535
    p = tmp_path / f"rgba16{ext}"
    write_image(p, rgb, alpha=alpha, bit_depth=16)
    img = read_image(p)
    assert img.bit_depth == 16 and not img.gray
    assert np.array_equal(np.rint(img.rgb * 257).astype(np.uint16), vals[..., :3])
    assert np.array_equal(np.rint(img.alpha * 65535).astype(np.uint16), vals[..., 3])

    g = tmp_path / f"la16{ext}"
    write_image(g, rgb[..., :1], alpha=alpha, gray=True, bit_depth=16)
    img = read_image(g)
    assert img.bit_depth == 16 and img.gray == (ext == ".png")  # 16-bit TIFF stores gray+alpha as RGBA
    assert np.array_equal(np.rint(img.rgb[..., 2] * 257).astype(np.uint16), vals[..., 0])
    assert np.array_equal(np.rint(img.alpha * 65535).astype(np.uint16), vals[..., 3])


def test_16bit_to_jpeg_warns(tmp_path: Path) -> None:
    warns = write_image(tmp_path / "x.jpg", np.full((4, 4, 3), 100.5, np.float32), bit_depth=16)
    assert any("16 bits" in w for w in warns)
    assert _open(tmp_path / "x.jpg").mode == "RGB"


# --------------------------------------------------------------------------- metadata


def _exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    ex[0x010F] = "CadyqCam"
    return ex.tobytes()


def _marked(h: int = 4, w: int = 6) -> np.ndarray:
    """Black image with a white top-left quadrant."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = 255
    return a


def test_exif_orientation_applied_and_reset(tmp_path: Path) -> None:
    p = tmp_path / "o6.jpg"
    Image.fromarray(_marked(16, 24)).save(p, exif=_exif(6), quality=100)
    img = read_image(p)
    assert img.rgb.shape == (24, 16, 3)  # rotated 90 degrees clockwise
    assert img.rgb[:8, -8:].mean() > 200 and img.rgb[-8:, :8].mean() < 50  # top-left -> top-right
    assert img.exif is not None and img.exif.startswith(b"Exif\x00\x00")
    ex = Image.Exif()
    ex.load(img.exif)
    assert ex[0x0112] == 1 and ex[0x010F] == "CadyqCam"

    out = tmp_path / "out.jpg"
    write_image(out, img.rgb, exif=img.exif)
    back = _open(out)
    assert back.size == (16, 24) and back.getexif()[0x0112] == 1 and back.getexif()[0x010F] == "CadyqCam"


def test_exif_orientation_on_16bit_colour_path(tmp_path: Path) -> None:
    p = tmp_path / "o6_16.png"
    write_image(p, _marked().astype(np.float32), bit_depth=16, exif=_exif(6))  # our encoder embeds eXIf
    img = read_image(p)
    assert img.bit_depth == 16 and img.rgb.shape == (6, 4, 3)
    assert img.rgb[0, -1, 0] == 255 and img.rgb[-1, 0, 0] == 0
    ex = Image.Exif()
    ex.load(img.exif)
    assert ex[0x0112] == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_numpy_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    from PIL import ImageOps

    a = np.arange(2 * 3, dtype=np.uint8).reshape(2, 3)
    p = tmp_path / "o.png"
    Image.fromarray(a).save(p, exif=_exif(orientation))
    expected = np.asarray(ImageOps.exif_transpose(_open(p)))
    assert np.array_equal(cio._orient(a, orientation), expected)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".tif"])
def test_icc_profile_carried(tmp_path: Path, ext: str) -> None:
    icc = _srgb_icc()
    p = tmp_path / f"icc{ext}"
    Image.fromarray(_smooth_rgb()).save(p, icc_profile=icc)
    img = read_image(p)
    assert img.icc_profile == icc
    out = tmp_path / f"icc_out{ext}"
    write_image(out, img.rgb, icc_profile=img.icc_profile)
    assert _open(out).info.get("icc_profile") == icc


def test_icc_colour_space_mismatch_is_skipped(tmp_path: Path) -> None:
    out = tmp_path / "g.png"
    warns = write_image(out, np.zeros((2, 2, 3)), gray=True, icc_profile=_srgb_icc())
    assert any("ICC" in w for w in warns) and "icc_profile" not in _open(out).info


def test_cmyk_jpeg_reads_as_rgb(tmp_path: Path) -> None:
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p, quality=100)  # pure red in CMYK
    img = read_image(p)
    assert img.rgb.shape == (8, 8, 3) and not img.gray and img.icc_profile is None
    r, g, b = img.rgb.reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (5, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = read_image(p)
    assert img.n_frames == 2 and img.format == "GIF"
    assert len(img.warnings) == 1 and "2 frames" in img.warnings[0]
    assert tuple(img.rgb[0, 0]) == (255, 0, 0)


# --------------------------------------------------------------------------- read errors


def _truncated(tmp_path: Path, ext: str) -> Path:
    src = tmp_path / f"full{ext}"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src)
    data = src.read_bytes()
    p = tmp_path / f"trunc{ext}"
    p.write_bytes(data[: len(data) // 2])
    return p


@pytest.mark.parametrize("kind", ["empty", "text", "missing", "trunc_png", "trunc_jpg", "dir"])
def test_bad_inputs_raise_read_error(tmp_path: Path, kind: str) -> None:
    if kind == "empty":
        p = tmp_path / "empty.png"
        p.write_bytes(b"")
    elif kind == "text":
        p = tmp_path / "notes.png"
        p.write_text("this is not an image\n")
    elif kind == "missing":
        p = tmp_path / "nope.png"
    elif kind == "dir":
        p = tmp_path / "folder.png"
        p.mkdir()
    else:
        p = _truncated(tmp_path, ".png" if kind == "trunc_png" else ".jpg")
    with pytest.raises(ImageReadError) as info:
        read_image(p)
    _assert_one_line(info.value, p)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global restored


def test_truncated_16bit_png_raises(tmp_path: Path) -> None:
    p = tmp_path / "t16.png"
    cv2.imwrite(str(p), RNG.integers(0, 65536, (64, 64, 3), dtype=np.uint16))
    p.write_bytes(p.read_bytes()[:4000])
    with pytest.raises(ImageReadError):
        read_image(p)


def test_pixel_limit_refuses_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "small.png"
    Image.fromarray(_smooth_rgb(20, 20)).save(p)
    calls = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(1) or real_load(self))
    with pytest.raises(ImageTooLargeError) as info:
        read_image(p, max_pixels=100)
    assert "--max-pixels" in str(info.value) and "20x20" in str(info.value)
    _assert_one_line(info.value, p)
    assert calls == []  # nothing was decoded
    assert read_image(p, max_pixels=400).rgb.shape == (20, 20, 3) and calls
    assert read_image(p, max_pixels=None).rgb.shape == (20, 20, 3)


def test_header_bomb_refused_by_default(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                  + _png_chunk(b"IEND", b""))
    with pytest.raises(ImageTooLargeError, match="100000x100000"):
        read_image(p)  # refused from the header alone; decoding would need 30 GB


# --------------------------------------------------------------------------- writing


def test_write_clamps_and_rounds(tmp_path: Path) -> None:
    rgb = np.array([[[-5.0, 0.5, 1.5], [254.6, 300.0, np.nan]]], np.float32)
    out = tmp_path / "c.png"
    write_image(out, rgb)
    assert np.asarray(_open(out)).tolist() == [[[0, 0, 2], [255, 255, 0]]]


def test_jpeg_drops_alpha_with_warning(tmp_path: Path) -> None:
    out = tmp_path / "a.jpg"
    warns = write_image(out, np.zeros((4, 4, 3)), alpha=np.ones((4, 4)))
    assert any("alpha" in w for w in warns) and _open(out).mode == "RGB"


def test_atomic_write_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    write_image(out, np.zeros((4, 4, 3)))
    assert os.listdir(tmp_path) == ["out.png"]
    before = out.read_bytes()
    with pytest.raises(ImageWriteError, match="exists") as info:
        write_image(out, np.full((4, 4, 3), 255.0))
    _assert_one_line(info.value, out)
    assert out.read_bytes() == before
    write_image(out, np.full((4, 4, 3), 255.0), overwrite=True)
    assert np.asarray(_open(out)).min() == 255
    assert os.listdir(tmp_path) == ["out.png"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def broken_fsync(fd: int) -> None:
        seen.append([n for n in os.listdir(tmp_path) if n.startswith(".out.png.") and n.endswith(".tmp")])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cio.os, "fsync", broken_fsync)
    out = tmp_path / "out.png"
    with pytest.raises(ImageWriteError, match="no space left") as info:
        write_image(out, np.zeros((4, 4, 3)))
    _assert_one_line(info.value, out)
    assert seen and len(seen[0]) == 1  # a hidden temp file was used...
    assert os.listdir(tmp_path) == []  # ...and removed


@pytest.mark.parametrize("ext", [".webp", ".png"])
def test_encoding_failure_is_write_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str) -> None:
    import imagecodecs

    def boom(*args: object, **kwargs: object) -> None:
        raise (OSError if ext == ".webp" else imagecodecs.PngError)("encoder exploded")

    monkeypatch.setattr(Image.Image, "save", boom)  # WebP: Pillow
    monkeypatch.setattr(imagecodecs, "png_encode", boom)  # PNG: libpng
    out = tmp_path / f"x{ext}"
    with pytest.raises(ImageWriteError, match="encoder exploded"):
        write_image(out, np.zeros((4, 4, 3)))
    assert os.listdir(tmp_path) == []


def test_png_without_imagecodecs_is_a_one_line_write_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # a broken install: the import fails
    with pytest.raises(ImageWriteError, match="needs the imagecodecs package"):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 3)))
    assert os.listdir(tmp_path) == []


def test_write_path_errors(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3))
    cases = [
        (tmp_path / "x.gif", "unknown extension"),
        (tmp_path / "noext", "unknown extension"),
        (tmp_path / "missing" / "x.png", "does not exist"),
    ]
    (tmp_path / "afile").write_text("")
    cases.append((tmp_path / "afile" / "x.png", "not a directory"))
    (tmp_path / "d.png").mkdir()
    cases.append((tmp_path / "d.png", "directory"))
    for path, reason in cases:
        with pytest.raises(ImageWriteError, match=reason) as info:
            write_image(path, rgb)
        _assert_one_line(info.value, path)
    assert not (tmp_path / "missing").exists()


def test_write_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_image(tmp_path / "x.png", np.zeros((2, 2)))
    with pytest.raises(ValueError):
        write_image(tmp_path / "x.png", np.zeros((2, 2, 3)), alpha=np.ones((3, 3)))
    with pytest.raises(ValueError):
        write_image(tmp_path / "x.png", np.zeros((2, 2, 3)), bit_depth=12)
    assert os.listdir(tmp_path) == []


def test_png_level_trades_size_for_speed_and_keeps_the_pixels(tmp_path: Path) -> None:
    """``png_level`` reaches the PNG writer's zlib at 8 and 16 bits: a higher level gives a smaller file of the
    same pixels; the default is :data:`cio.PNG_LEVEL`; 0..9 only."""
    yy, xx = np.mgrid[0:96, 0:128]
    smooth = np.stack([xx * 2, yy * 2, (xx + yy)], axis=2).astype(np.float32)
    img = np.clip(smooth + np.random.default_rng(1).normal(0, 3, smooth.shape), 0, 255)
    for depth in (8, 16):
        sizes = {}
        for level in (0, 1, 9, None):
            dst = tmp_path / f"{depth}_{level}.png"
            write_image(dst, img, bit_depth=depth, **({} if level is None else {"png_level": level}))
            assert np.array_equal(read_image(dst).rgb, read_image(tmp_path / f"{depth}_0.png").rgb)
            sizes[level] = dst.stat().st_size
        assert sizes[9] < sizes[1] < sizes[0], (depth, sizes)
        write_image(tmp_path / f"{depth}_dflt.png", img, bit_depth=depth, png_level=cio.PNG_LEVEL)
        assert (tmp_path / f"{depth}_dflt.png").read_bytes() == (tmp_path / f"{depth}_None.png").read_bytes()
    for bad in (-1, 10):
        with pytest.raises(ValueError, match="png_level"):
            write_image(tmp_path / "bad.png", img, png_level=bad)
    assert not (tmp_path / "bad.png").exists()


def test_uint8_samples_and_floats_write_the_same_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f = rng.uniform(-20, 280, (300, 7000, 3)).astype(np.float32)  # several 4 MiB row blocks
    f[0, 0, 0], f[1, 1, 1], f[2, 2, 2] = np.nan, np.inf, -np.inf
    expect = np.rint(np.clip(np.nan_to_num(f, nan=0.0, posinf=255, neginf=0), 0, 255)).astype(np.uint8)
    write_image(tmp_path / "f.png", f)
    write_image(tmp_path / "u.png", expect)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "f.png")), expect)
    assert (tmp_path / "f.png").read_bytes() == (tmp_path / "u.png").read_bytes()
    write_image(tmp_path / "u16.png", expect, bit_depth=16)  # uint8 samples widened, not passed through
    assert np.array_equal(read_image(tmp_path / "u16.png").rgb, expect.astype(np.float32))


@pytest.mark.parametrize("depth", [8, 16])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_is_valid_with_metadata_chunks_before_the_pixels(tmp_path: Path, channels: int, depth: int) -> None:
    """libpng encodes the pixels, iCCP and eXIf are spliced in after IHDR: every chunk's CRC holds,
    IHDR says the bit depth and colour type, and the pixels decode unchanged."""
    from cadyq_cli.io import encode_image

    top = (1 << depth) - 1
    vals = RNG.integers(0, top + 1, (7, 9, channels), dtype=np.uint16)
    colour, alpha = (vals, None) if channels in (1, 3) else (vals[..., :-1], vals[..., -1] / top)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB" if channels >= 3 else "LAB")).tobytes()
    data, _ = encode_image("x.png", colour.astype(np.float32) / (top / 255), alpha=alpha, gray=channels <= 2,
                           bit_depth=depth, icc_profile=icc if channels >= 3 else None, exif=_exif(1))
    pos, kinds = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body, crc = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n], data[pos + 8 + n:pos + 12 + n]
        assert struct.unpack(">I", crc)[0] == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        kinds.append(kind)
        if kind == b"IHDR":
            w, h, bits, ctype = struct.unpack(">IIBB", body[:10])
            assert (w, h, bits, ctype) == (9, 7, depth, {1: 0, 2: 4, 3: 2, 4: 6}[channels])
        pos += 12 + n
    expect = [b"IHDR"] + ([b"iCCP"] if channels >= 3 else []) + [b"eXIf"]
    assert kinds[:len(expect)] == expect and kinds[-1] == b"IEND" and b"IDAT" in kinds
    p = tmp_path / "x.png"
    p.write_bytes(data)
    img = read_image(p)
    assert img.bit_depth == depth
    got = np.rint(img.rgb * (top / 255)).astype(np.uint16)
    assert np.array_equal(got[..., :1] if channels <= 2 else got, vals[..., :1] if channels <= 2 else vals[..., :3])
    if alpha is not None:
        assert np.array_equal(np.rint(img.alpha * top).astype(np.uint16), vals[..., -1])


# --------------------------------------------------------------------------- decoder diagnostics (found by tests/test_fuzz.py)


def _tiff_tag(data: bytearray, tag: int, value: int) -> bytearray:
    """Set the value/offset field of ``tag`` in the first IFD of a little-endian TIFF."""
    (ifd,) = struct.unpack("<I", data[4:8])
    (n,) = struct.unpack("<H", data[ifd:ifd + 2])
    for k in range(n):
        e = ifd + 2 + 12 * k
        if struct.unpack("<H", data[e:e + 2])[0] == tag:
            data[e + 8:e + 12] = struct.pack("<I", value)
            return data
    raise KeyError(tag)


def test_corrupt_exif_is_a_one_line_warning_not_a_python_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    exif = Image.Exif()
    exif[0x010E] = "a description long enough to live outside the IFD"
    raw = bytearray(exif.tobytes())
    start = 6 if raw[:4] == b"Exif" else 0
    order = "<" if raw[start:start + 2] == b"II" else ">"
    (count,) = struct.unpack(order + "H", raw[start + 8:start + 10])
    raw[start + 8:start + 10] = struct.pack(order + "H", count + 5)  # more IFD entries than the block holds
    path = tmp_path / "exif.jpg"
    Image.fromarray(_smooth_rgb(12, 16)).save(path, exif=bytes(raw))
    img = read_image(path)
    assert img.width == 16
    notes = [w for w in img.warnings if w.startswith("decoder: ")]
    assert notes and "Corrupt EXIF" in notes[0] and all("\n" not in w for w in img.warnings)
    assert not [w for w in recwarn if "PIL" in w.filename]


def test_libtiff_messages_go_into_the_error_not_onto_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lzw.tif"
    Image.fromarray(_smooth_rgb(12, 16)).save(path, compression="tiff_lzw")
    path.write_bytes(_tiff_tag(bytearray(path.read_bytes()), 279, 5000))  # StripByteCounts beyond the file
    capfd.readouterr()
    with pytest.raises(ImageReadError) as exc:
        read_image(path)
    msg = str(exc.value)
    assert "libtiff: TIFFFillStrip" in msg and "\n" not in msg
    assert "TIFF" not in capfd.readouterr().err


def test_temp_files_finds_only_our_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    ours = [tmp_path / ".out.png.0123abcd.tmp", tmp_path / ".out.png.ffffffff.tmp"]
    others = [tmp_path / ".out.png.tmp", tmp_path / ".out.png.0123ABCD.tmp", tmp_path / ".other.png.0123abcd.tmp",
              tmp_path / "out.png.0123abcd.tmp", tmp_path / ".out.png.0123abcde.tmp"]
    for p in ours + others:
        p.write_bytes(b"x")
    assert sorted(cio.temp_files([target, tmp_path / "missing" / "x.png"])) == sorted(ours)


def test_pillow_log_errors_stay_out_of_stderr(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spp.tif"
    Image.fromarray(_smooth_rgb(12, 16)).save(path)
    path.write_bytes(_tiff_tag(bytearray(path.read_bytes()), 277, 65407))  # SamplesPerPixel: Pillow logs an error
    with caplog.at_level(logging.DEBUG), pytest.raises(ImageReadError) as exc:
        read_image(path)
    _assert_one_line(exc.value, path)
    assert not [r for r in caplog.records if r.name.startswith("PIL") and r.levelno >= logging.WARNING]
    assert logging.getLogger("PIL").propagate  # restored after the read
