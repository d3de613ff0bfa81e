"""Decoding untrusted image bytes: every bad input becomes an ImageError, never a crash."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlray.images import (
    MAX_PIXELS,
    ImageError,
    check_image_file,
    decode_image,
    decode_on_device,
    device_decodable,
    read_image_bytes,
    resample_matrix,
    resolve_under_root,
    to_model_input,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noisy(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- good images


def test_png_and_jpeg_round_trip() -> None:
    img = noisy()
    out = decode_image(encode(img, "PNG"))
    assert out.mode == "RGB" and out.size == (64, 48)
    assert np.array_equal(np.asarray(out), np.asarray(img))
    jpeg = decode_image(encode(img, "JPEG", quality=95))
    assert jpeg.mode == "RGB" and jpeg.size == (64, 48)


def test_cmyk_jpeg_becomes_rgb() -> None:
    red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    out = decode_image(encode(red, "JPEG", quality=95))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 230 and g < 30 and b < 30


def test_16bit_png_is_scaled_not_clipped() -> None:
    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert grey16.mode == "I;16"
    out = decode_image(encode(grey16, "PNG"))
    assert out.mode == "RGB"
    assert all(abs(v - 128) <= 1 for v in out.getpixel((4, 4)))


def test_32bit_int_and_float_tiff() -> None:
    as_int = Image.fromarray(np.full((8, 8), 65535 // 4, dtype=np.int32))
    assert as_int.mode == "I"
    assert abs(decode_image(encode(as_int, "TIFF")).getpixel((0, 0))[0] - 64) <= 1
    as_float = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert as_float.mode == "F"
    assert abs(decode_image(encode(as_float, "TIFF")).getpixel((0, 0))[0] - 128) <= 1


@pytest.mark.parametrize("mode", ["L", "1", "LA", "RGBA", "P"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = noisy().convert(mode)
    out = decode_image(encode(img, "PNG"))
    assert out.mode == "RGB" and out.size == img.size


def test_transparent_palette_png_composites_on_white() -> None:
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # index 0 black, 1 red
    img.paste(1, (0, 0, 5, 10))
    out = decode_image(encode(img, "PNG", transparency=0))
    assert out.getpixel((2, 5)) == (255, 0, 0)
    assert out.getpixel((8, 5)) == (255, 255, 255)  # transparent black -> white, not black


def test_rgba_and_la_composite_on_white() -> None:
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(encode(clear, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("LA", (4, 4), (0, 128))
    assert all(abs(v - 127) <= 1 for v in decode_image(encode(half, "PNG")).getpixel((0, 0)))


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


# --------------------------------------------------------------------------- bad bytes


def test_truncated_jpeg() -> None:
    data = encode(noisy((256, 256)), "JPEG", quality=95)
    with pytest.raises(ImageError, match=r"^truncated JPEG: .*truncated"):
        decode_image(data[: len(data) // 2])


def test_random_bytes() -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="cannot identify image file"):
        decode_image(data)


def test_empty_bytes() -> None:
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")


def test_errors_are_one_line() -> None:
    data = encode(noisy((256, 256)), "PNG")
    for bad in (data[:200], data[:-40], b"\x89PNG\r\n\x1a\n" + b"\x00" * 50):
        with pytest.raises(ImageError) as info:
            decode_image(bad)
        assert "\n" not in str(info.value) and str(info.value)


# --------------------------------------------------------------------------- bombs


def test_large_cheap_image_over_small_limit() -> None:
    data = encode(Image.new("1", (10_000, 6_000)), "PNG")  # 60M pixels in a few kB
    with pytest.raises(ImageError, match="too large.*10000x6000"):
        decode_image(data, max_pixels=1_000_000)


def test_crafted_header_refused_before_loading() -> None:
    # 64M pixels: under Pillow's own limit, over ours; the pixel data is bogus, so the only
    # way to get "too large" instead of a decode error is to check before loading.
    with pytest.raises(ImageError, match="too large.*8000x8000"):
        decode_image(png_claiming(8_000, 8_000))
    assert 8_000 * 8_000 > MAX_PIXELS


@pytest.mark.parametrize("side", [10_000, 100_000])  # Pillow warns at 89M, refuses at 179M
def test_pillow_bomb_warning_and_error_become_image_error(side: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked DecompressionBombWarning would fail here
        with pytest.raises(ImageError, match="too large"):
            decode_image(png_claiming(side, side))
    assert Image.MAX_IMAGE_PIXELS == limit  # no process-wide setting changed


def test_generous_limit_still_accepts_normal_images() -> None:
    assert decode_image(encode(noisy(), "PNG"), max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageError):
        decode_image(encode(noisy(), "PNG"), max_pixels=64 * 48 - 1)


# --------------------------------------------------------------------------- files


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "img" / "a.png").write_bytes(encode(noisy(), "PNG"))
    (root / "img" / "empty.png").write_bytes(b"")
    (outside / "secret.png").write_bytes(encode(noisy(), "PNG"))
    os.symlink(outside / "secret.png", root / "img" / "link.png")
    os.symlink(root / "img" / "a.png", root / "img" / "inner-link.png")
    return root, outside


def test_read_image_bytes(tree) -> None:
    root, _ = tree
    data = read_image_bytes("img/a.png", str(root))
    assert decode_image(data).size == (64, 48)
    assert read_image_bytes(str(root / "img" / "a.png"), str(root)) == data
    assert read_image_bytes("img/inner-link.png", str(root)) == data
    assert read_image_bytes("img/../img/a.png", str(root)) == data
    assert read_image_bytes(f"file://{root}/img/a.png", str(root)) == data
    assert read_image_bytes(str(root / "img" / "a.png"), None) == data


@pytest.mark.parametrize(
    "path, message",
    [
        ("img/missing.png", "missing file"),
        ("img/empty.png", "zero-byte file"),
        ("img", "not a file"),
        ("../outside/secret.png", "escapes the dataset root"),
        ("img/link.png", "escapes the dataset root"),
        ("/etc/passwd", "escapes the dataset root"),
        ("s3://bucket/x.png", "escapes the dataset root"),
        ("", "empty image path"),
    ],
)
def test_read_image_bytes_refuses(tree, path: str, message: str) -> None:
    root, _ = tree
    with pytest.raises(ImageError, match=message):
        read_image_bytes(path, str(root))


def test_resolve_under_root_for_uris() -> None:
    assert resolve_under_root("a/b.png", "s3://bucket/ds") == "s3://bucket/ds/a/b.png"
    assert resolve_under_root("s3://bucket/ds/x.png", "s3://bucket/ds/") == "s3://bucket/ds/x.png"
    for bad in ("../other/x.png", "/ds/x.png", "s3://other/ds/x.png", "s3://bucket/dsx/y.png"):
        with pytest.raises(ImageError, match="escapes the dataset root"):
            resolve_under_root(bad, "s3://bucket/ds")


def test_check_image_file_returns_size(tree) -> None:
    root, _ = tree
    assert check_image_file(str(root / "img" / "a.png")) == (root / "img" / "a.png").stat().st_size


# --------------------------------------------------------------------------- model input


def test_to_model_input_resizes_and_centre_crops() -> None:
    arr = np.zeros((200, 300, 3), dtype=np.uint8)
    arr[:, 100:200] = 255  # a white centre third
    out = to_model_input(Image.fromarray(arr), 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    # Resized to 336x224 then cropped at x=56: the white band spans 112..224 -> 56..168.
    assert out[112, 112].min() == 255 and out[112, 20].max() == 0 and out[112, 200].max() == 0


def test_to_model_input_resize_then_crop_and_modes() -> None:
    out = to_model_input(noisy((500, 400)).convert("L"), 224, resize=256, interpolation="bilinear")
    assert out.shape == (224, 224, 3)
    same = to_model_input(noisy((224, 224)), 224)
    assert np.array_equal(same, np.asarray(noisy((224, 224))))  # already the right size


def test_to_model_input_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        to_model_input(noisy(), 32, interpolation="cubic-ish")
    with pytest.raises(ValueError, match="size"):
        to_model_input(noisy(), 32, resize=16)


# --------------------------------------------------------------------------- the GPU decoder path


def photo_jpeg(size: tuple[int, int], seed: int, **kw) -> bytes:
    """A smooth photo-like JPEG (noise alone would exaggerate decoder rounding)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return encode(coarse.resize(size, Image.Resampling.BICUBIC), "JPEG", quality=90, **kw)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_device_decoding_gives_the_cpu_paths_pixels(interpolation: str) -> None:
    """decode_on_device (nvJPEG on a GPU, libjpeg here) then tensor resize/crop matches
    decode_image + to_model_input within one intensity level, over mixed sizes in one batch."""
    data = [
        photo_jpeg(s, i) for i, s in enumerate([(640, 480), (480, 640), (333, 500), (640, 480)])
    ]
    data.append(encode(noisy((300, 200)).convert("L"), "JPEG", quality=90))  # greyscale
    out, failed = decode_on_device(data, 64, 73, interpolation, "cpu")
    assert failed == {}
    ref = np.stack([to_model_input(decode_image(d), 64, 73, interpolation) for d in data])
    diff = np.abs(out.numpy().astype(int) - ref.astype(int))
    assert out.shape == (5, 64, 64, 3) and diff.max() <= 1, diff.max()


def test_device_decoding_reports_a_corrupt_file_and_keeps_the_rest() -> None:
    good = photo_jpeg((200, 150), 0)
    bad = good[:40] + bytes(64) + good[104:]  # a header nvJPEG and libjpeg both choke on
    out, failed = decode_on_device([good, bad[:60], good], 32, 32, "bicubic", "cpu")
    assert list(failed) == [1] and "JPEG" in failed[1]
    assert out[0].float().std() > 0 and (out[0] == out[2]).all()


def test_only_what_nvjpeg_decodes_exactly_goes_to_the_device() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    assert device_decodable(photo_jpeg((64, 48), 0), "bicubic")
    assert not device_decodable(photo_jpeg((64, 48), 0), "lanczos")
    assert not device_decodable(photo_jpeg((64, 48), 0, exif=exif.tobytes()), "bicubic")
    assert not device_decodable(photo_jpeg((64, 48), 0, progressive=True), "bicubic")
    assert not device_decodable(encode(noisy(), "PNG"), "bicubic")
    assert not device_decodable(encode(noisy().convert("CMYK"), "JPEG"), "bicubic")
    with pytest.raises(ImageError, match="decompression bomb"):
        device_decodable(png_claiming(20_000, 20_000), "bicubic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_nvjpeg_pixels_are_close_to_the_cpu_paths() -> None:
    """nvJPEG's IDCT rounds differently from libjpeg's: on photo-sized JPEGs the model input
    differs by under one level on average and a few levels at most (measured on an H100:
    mean 0.45, 99.9th percentile 3, max 10 over 64 of these JPEGs, 2026-11-23)."""
    from vlray.bench.workload import photo_jpegs

    data = photo_jpegs(12)
    out, failed = decode_on_device(data, 224, 248, "bicubic", "cuda")
    ref = np.stack([to_model_input(decode_image(d), 224, 248, "bicubic") for d in data])
    diff = np.abs(out.cpu().numpy().astype(int) - ref.astype(int))
    assert failed == {} and diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 4, diff.max()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(640, 480), (333, 500), (120, 90), (90, 120)])
def test_resample_matrix_is_pillows_arithmetic(interpolation: str, size: tuple[int, int]) -> None:
    """The device path's resize (horizontal pass rounded to 8 bits, then vertical) equals
    Pillow's on noise, the hardest case for rounding, down and up, for aspect-kept resizes."""
    img = noisy(size, seed=size[0])
    for short in (249, 64, 200):
        w, h = img.size
        new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        f = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
        ref = np.asarray(img.resize((new_w, new_h), f[interpolation])).astype(int)
        x = np.asarray(img, dtype=np.float64).transpose(2, 0, 1)
        wx = resample_matrix(w, new_w, interpolation)
        wy = resample_matrix(h, new_h, interpolation)
        mid = np.clip(np.floor(x @ wx.T + 0.5), 0, 255)
        out = np.clip(np.floor(wy @ mid + 0.5), 0, 255).transpose(1, 2, 0)
        assert np.abs(out - ref).max() == 0, (size, short)
