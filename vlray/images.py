"""Reading and decoding images from untrusted files, and preparing them for a model.

Images come from users' datasets, so every failure (a missing or empty file, a path that
escapes the dataset root, bytes that are not an image, a truncated file, a decompression
bomb) is raised as ``ImageError`` with a one-line reason; callers quarantine the item and
carry on. Nothing here changes process-wide Pillow settings.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import warnings
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageOps, UnidentifiedImageError

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


class ImageError(ValueError):
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
        raise ImageError(f"cannot stat {path}: {_one_line(e)}") from e
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
        raise ImageError(f"cannot read {resolved}: {_one_line(e)}") from e


# --------------------------------------------------------------------------- decoding


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


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
        raise ImageError(f"image too large (possible decompression bomb): {_one_line(e)}") from e
    except UnidentifiedImageError as e:
        raise ImageError(
            f"cannot identify image file: {len(data)} bytes starting with "
            f"{data[:8].hex()} are not in a known image format"
        ) from e
    except Exception as e:  # any plugin may choke on a hostile header
        raise ImageError(f"cannot identify image file: {_one_line(e)}") from e
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
        reason = _one_line(e)
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
            raise ImageError(f"unsupported image mode {img.mode}: {_one_line(e)}") from e
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

    Returns a ``(B, size, size, 3)`` uint8 tensor on ``device`` (rows that failed are zeros)
    and ``{row: reason}`` for the failures. Resizing runs on the GPU in groups of equal input
    size, with antialiasing as Pillow does; pixels agree with the CPU path within a few
    intensity levels (the two decoders' IDCTs round differently).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    out = torch.zeros((len(data), size, size, 3), dtype=torch.uint8, device=device)
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
                failed[i] = f"corrupt JPEG: {_one_line(err)}"
                decoded.append(None)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(decoded):
        if img is not None:
            groups.setdefault(tuple(img.shape[1:]), []).append(i)
    mode = InterpolationMode(interpolation)
    for (height, width), rows in groups.items():
        batch = torch.stack([decoded[i] for i in rows])
        new_w, new_h = _resized_size(width, height, resize)
        if (new_h, new_w) != (height, width):
            batch = F.resize(batch, [new_h, new_w], interpolation=mode, antialias=True)
        batch = F.center_crop(batch, [size, size])
        out[torch.as_tensor(rows, device=device)] = batch.permute(0, 2, 3, 1)
    return out, failed
