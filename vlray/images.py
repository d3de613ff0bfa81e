"""Reading and decoding images from untrusted files, and preparing them for a model.

Images come from users' datasets, so every failure (a missing or empty file, a path that
escapes the dataset root, bytes that are not an image, a truncated file, a decompression
bomb) is raised as ``ImageError`` with a one-line reason; callers quarantine the item and
carry on. Nothing here changes process-wide Pillow settings.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import re
import warnings
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageOps, UnidentifiedImageError

from vlray.errors import VlrayError, one_line

# Refuse images whose header claims more pixels than this (a 7000x7000 photo is 49M).
MAX_PIXELS: int = 50_000_000

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

_WHITE = (255, 255, 255, 255)


class ImageError(VlrayError, ValueError):
    """An image that cannot be used; the message is one line a person understands."""


# --------------------------------------------------------------------------- paths


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` paths (s3://, gs://, file://), False for local paths."""
    return bool(_URI.match(path))


def local_path(path: str) -> str | None:
    """The local path behind ``path`` (plain or file://), or None for a remote URI."""
    if path.startswith("file://"):
        return unquote(urlparse(path).path)
    return None if is_uri(path) else path


def _resolve_local(path: str, root: str) -> str:
    root_real = os.path.realpath(root)
    # An absolute `path` replaces the root in join; realpath then follows symlinks and '..'.
    real = os.path.realpath(os.path.join(root_real, path))
    if os.path.commonpath([root_real, real]) != root_real:
        raise ImageError(f"path {path!r} escapes the dataset root {root}")
    return real


def _resolve_uri(path: str, root: str) -> str:
    base = urlparse(root)
    if is_uri(path):
        target = urlparse(path)
        if (target.scheme, target.netloc) != (base.scheme, base.netloc):
            raise ImageError(f"path {path!r} escapes the dataset root {root}")
        rel = target.path
    elif path.startswith("/"):
        raise ImageError(f"path {path!r} escapes the dataset root {root}")
    else:
        rel = posixpath.join(base.path or "/", path)
    # Object stores have no symlinks; only '..' can lead out, and normpath removes it.
    root_path = posixpath.normpath(base.path or "/")
    full = posixpath.normpath(rel)
    if posixpath.commonpath([root_path, full]) != root_path:
        raise ImageError(f"path {path!r} escapes the dataset root {root}")
    return f"{base.scheme}://{base.netloc}{full}"


def resolve_under_root(path: str, root: str | None) -> str:
    """Resolve ``path`` (relative to ``root``, or absolute) and refuse it if it leaves ``root``.

    Local paths are resolved with symlinks and '..' followed, so a link pointing outside the
    root is refused too. With ``root`` None nothing is refused. Raises ``ImageError``.
    """
    if not path or not path.strip():
        raise ImageError("empty image path")
    if root is None:
        local = local_path(path)
        return path if local is None else os.path.abspath(local)
    root_local, path_local = local_path(root), local_path(path)
    if root_local is not None:
        if path_local is None:
            raise ImageError(f"path {path!r} escapes the dataset root {root}")
        return _resolve_local(path_local, root_local)
    return _resolve_uri(path, root)


def filesystem_and_path(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a local path or URI, and the path inside it."""
    local = local_path(path)
    if local is not None:
        return pafs.LocalFileSystem(), os.path.abspath(local)
    return pafs.FileSystem.from_uri(path)


def check_image_file(path: str) -> int:
    """Stat a resolved path without reading it; return its size in bytes.

    Raises ``ImageError`` for a missing file, a directory, or a zero-byte file.
    """
    try:
        fs, fs_path = filesystem_and_path(path)
        info = fs.get_file_info(fs_path)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot stat {path}: {one_line(e)}") from e
    if info.type == pafs.FileType.NotFound:
        raise ImageError(f"missing file: {path}")
    if info.type != pafs.FileType.File:
        raise ImageError(f"not a file: {path}")
    if not info.size:
        raise ImageError(f"zero-byte file: {path}")
    return int(info.size)


def read_image_bytes(path: str, root: str | None) -> bytes:
    """Read an image file's bytes (local path or URI) after the root and size checks."""
    resolved = resolve_under_root(path, root)
    check_image_file(resolved)
    try:
        fs, fs_path = filesystem_and_path(resolved)
        with fs.open_input_stream(fs_path) as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"cannot read {resolved}: {one_line(e)}") from e


# --------------------------------------------------------------------------- decoding


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse decompression bombs before any pixel is read."""
    try:
        # Pillow warns about (and above twice its limit, refuses) big images inside open().
        # Our own max_pixels check just below is the authority, so its warning is only
        # silenced, for this call only; catch_warnings restores the filters on exit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large (possible decompression bomb): {one_line(e)}") from e
    except UnidentifiedImageError as e:
        raise ImageError(
            f"cannot identify image file: {len(data)} bytes starting with "
            f"{data[:8].hex()} are not in a known image format"
        ) from e
    except Exception as e:  # any plugin may choke on a hostile header
        raise ImageError(f"cannot identify image file: {one_line(e)}") from e
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"image too large (possible decompression bomb): {img.format} header claims "
            f"{width}x{height} = {width * height:,} pixels, limit {max_pixels:,}"
        )
    return img


def _load(img: Image.Image) -> None:
    """Decode all pixels now, so truncated or corrupt data fails here and not later."""
    fmt = img.format or "image"
    try:
        img.load()
    except Exception as e:  # decoders raise OSError, SyntaxError, struct.error...
        reason = one_line(e)
        kind = "truncated" if "truncat" in reason.lower() or isinstance(e, EOFError) else "corrupt"
        raise ImageError(f"{kind} {fmt}: {reason}") from e


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, so a phone photo is upright."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF should not lose otherwise good pixels
        return img


def _rescale_to_uint8(values: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Map integer/float pixels to 0..255: by a known full scale, else by their own range."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if full_scale is None:
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    else:
        values = values / full_scale
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale to 8-bit "L", scaled rather than clipped."""
    values = np.asarray(img)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        full_scale: float | None = 65535.0  # 16-bit data (Pillow stores 16-bit PNG/TIFF so)
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        full_scale = 1.0
    elif img.mode == "F" and lo >= 0 and hi <= 255:
        full_scale = 255.0
    else:
        full_scale = None
    return Image.fromarray(_rescale_to_uint8(values, full_scale), mode="L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to "RGB": transparency over white, high bit depths scaled to 8 bits."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageError(f"unsupported image mode {img.mode}: {one_line(e)}") from e
    return img


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an upright RGB image; raise ``ImageError`` if unusable."""
    if not data:
        raise ImageError("empty image data (0 bytes)")
    img = _open(bytes(data), max_pixels)
    _load(img)
    return to_rgb(_orient(img))


# --------------------------------------------------------------------------- model input


def _resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    # Same rounding as torchvision's Resize(int), which timm's eval transforms use.
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def to_model_input(
    img: Image.Image, size: int, resize: int | None = None, interpolation: str = "bicubic"
) -> np.ndarray:
    """Resize the shorter side to ``resize`` (default ``size``), centre-crop ``size`` x ``size``.

    Returns a contiguous uint8 array of shape (size, size, 3).
    """
    resize = size if resize is None else resize
    if size <= 0 or resize < size:
        raise ValueError(f"need 0 < size <= resize, got size={size}, resize={resize}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
    img = img if img.mode == "RGB" else to_rgb(img)
    new_size = _resized_size(*img.size, resize)
    if new_size != img.size:
        img = img.resize(new_size, _INTERPOLATIONS[interpolation])
    width, height = img.size
    # torchvision's center_crop rounds the offsets the same way.
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


# --------------------------------------------------------------------------- decoding on a GPU

# Interpolations whose tensor resize matches Pillow's within one level (nearest does not:
# the two place sample points differently).
_TENSOR_INTERPOLATIONS = ("bilinear", "bicubic")


def device_decodable(data: bytes, interpolation: str, *, max_pixels: int = MAX_PIXELS) -> bool:
    """Whether nvJPEG gives the pixels the CPU path would: a baseline RGB or greyscale JPEG,
    upright (no EXIF rotation), within the pixel limit, resized with a tensor interpolation.

    Reads the header only. Raises ``ImageError`` for bytes that ``decode_image`` would refuse,
    so a bad item is quarantined whichever path would have decoded it.
    """
    if not data:
        raise ImageError("empty image data (0 bytes)")
    img = _open(bytes(data), max_pixels)
    if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.info.get("progressive"):
        return False
    if interpolation not in _TENSOR_INTERPOLATIONS:
        return False
    try:
        return img.getexif().get(0x0112, 1) == 1  # 0x0112: EXIF orientation
    except Exception:  # unreadable EXIF: let the CPU path decide what to do with it
        return False


def decode_on_device(
    data: list[bytes], size: int, resize: int, interpolation: str, device: str
) -> tuple[object, dict[int, str]]:
    """Decode JPEGs with nvJPEG (libjpeg on a CPU device), then resize and crop as
    ``to_model_input`` does: shorter side to ``resize``, centre crop ``size``.

    Returns a ``(B, size, size, 3)`` uint8 tensor on ``device`` (rows that failed are zeros;
    its memory is channels-first, ``(B, 3, size, size)`` permuted, which is what a model
    wants) and ``{row: reason}`` for the failures. Resizing is Pillow's own arithmetic
    (``resample_matrix``) done as two matrix products per group of equal input size, so the
    pixels equal the CPU path's up to the two decoders' IDCT rounding (none with libjpeg;
    nvJPEG's differs by under one level on average). Call it inside the CUDA stream that will
    use the result: the decoder's stream is joined to the current one, and nothing here waits
    for the device.
    """
    decoded, failed = decode_jpegs(data, device)
    return resize_decoded(decoded, size, resize, interpolation, device), failed


def decode_jpegs(data: list[bytes], device: str) -> tuple[list, dict[int, str]]:
    """nvJPEG (libjpeg on a CPU device) over a whole batch in one call: ``(B, 3, h, w)`` uint8
    tensors (None where a file failed) and ``{row: reason}`` for the failures."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    failed: dict[int, str] = {}
    with warnings.catch_warnings():
        # Wrapping the bytes without a copy: torch warns that they are read-only, and
        # decode_jpeg only reads them.
        warnings.simplefilter("ignore", UserWarning)
        encoded = [torch.frombuffer(d, dtype=torch.uint8) for d in data]
    try:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the whole batch: find it one by one
        decoded = []
        for i, e in enumerate(encoded):
            try:
                decoded.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as err:
                failed[i] = f"corrupt JPEG: {one_line(err)}"
                decoded.append(None)
    return decoded, failed


def resize_decoded(decoded: list, size: int, resize: int, interpolation: str, device: str):
    """``decode_jpegs``'s images resized and cropped as ``to_model_input`` does, in groups of
    equal size: ``(B, size, size, 3)`` uint8 (channels-first memory), zeros where None."""
    import torch

    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(decoded):
        if img is not None:
            groups.setdefault(tuple(img.shape[1:]), []).append(i)
    pieces, order = [], []
    for rows in groups.values():
        batch = (
            decoded[rows[0]][None] if len(rows) == 1 else torch.stack([decoded[i] for i in rows])
        )
        pieces.append(_resize_crop(batch, size, resize, interpolation))
        order += rows
    if order and order == list(range(len(decoded))):
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    else:  # failed rows, or several sizes: one scatter into place
        out = torch.zeros((len(decoded), 3, size, size), dtype=torch.uint8, device=device)
        if order:
            index = _index_on(order, out.device)
            out.index_copy_(0, index, pieces[0] if len(pieces) == 1 else torch.cat(pieces))
    return out.permute(0, 2, 3, 1)


def _index_on(rows: list[int], device) -> object:
    """Row indices on ``device`` without blocking the thread (page-locked copy on a GPU)."""
    import torch

    index = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index


def _resize_crop(batch, size: int, resize: int, interpolation: str):
    """``(g, 3, h, w)`` uint8 images of one size -> ``(g, 3, size, size)`` uint8, as
    ``to_model_input``: Pillow's horizontal pass (rounded to 8 bits), then its vertical pass,
    each as one matrix product over the rows/columns the centre crop keeps."""
    import torch

    height, width = batch.shape[-2:]
    new_w, new_h = _resized_size(width, height, resize)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    if (new_w, new_h) == (width, height):  # Pillow does not resample: a plain crop
        return batch[..., top : top + size, left : left + size].contiguous()
    wx, c0, c1 = _crop_weights(width, new_w, left, size, interpolation, str(batch.device))
    wy, r0, r1 = _crop_weights(height, new_h, top, size, interpolation, str(batch.device))
    x = batch[..., r0:r1, c0:c1].float()
    x = torch.matmul(x, wx.T).add_(0.5).floor_().clamp_(0.0, 255.0)  # (g, 3, rows, size)
    x = torch.matmul(wy, x).add_(0.5).floor_().clamp_(0.0, 255.0)  # (g, 3, size, size)
    return x.to(torch.uint8)


@functools.lru_cache(maxsize=128)
def _crop_weights(in_size: int, out_size: int, start: int, size: int, interpolation: str, device):
    """Rows ``start:start+size`` of ``resample_matrix`` on ``device``, trimmed to the input
    range ``[lo, hi)`` they touch: ``(weights, lo, hi)``."""
    import torch

    w = resample_matrix(in_size, out_size, interpolation)[start : start + size]
    touched = np.flatnonzero(w.any(axis=0))
    lo, hi = int(touched[0]), int(touched[-1]) + 1
    return torch.from_numpy(np.ascontiguousarray(w[:, lo:hi], dtype=np.float32)).to(device), lo, hi


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(
        x < 1.0,
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
        np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0),
    )


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


_FILTERS = {"bilinear": (_triangle, 1.0), "bicubic": (_bicubic, 2.0)}


def resample_matrix(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """Pillow's 8-bit resampling weights as a dense ``(out_size, in_size)`` matrix.

    The same arithmetic as Pillow's ``Resample.c``: a filter widened by the downscaling factor
    (antialiasing), each output's taps normalised to sum to one, then rounded to the fixed
    point (22 fractional bits) its 8-bit path multiplies with. ``W @ pixels``, rounded half up
    and clipped to 0..255, is Pillow's one-dimensional pass.
    """
    filt, support = _FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    out = np.zeros((out_size, in_size))
    one = float(1 << 22)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = filt((np.arange(lo, hi) - center + 0.5) / filterscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        out[xx, lo:hi] = np.trunc(w * one + np.where(w < 0, -0.5, 0.5)) / one
    return out
