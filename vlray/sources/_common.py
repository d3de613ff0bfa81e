"""Helpers shared by the loaders of real dataset formats: parameter checks, file access,
split names and a collector of item and quarantine rows."""

from __future__ import annotations

import operator
import os
import re

import pyarrow as pa
import pyarrow.fs as pafs

from vlray.errors import one_line
from vlray.images import (
    ImageError,
    check_image_file,
    filesystem_and_path,
    local_path,
    resolve_under_root,
)
from vlray.items import IMAGE, items_table, quarantine_row, quarantine_table
from vlray.sources import SourceError

DEFAULT_SPLIT = "train"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_SPLIT_WORD = re.compile(r"(?<![a-z])(train|validation|val|test)")


def text_or_none(value: object) -> str | None:
    """Optional text: None and blank strings are both absent."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def image_value(value: object) -> bytes | str | None:
    """Bytes, a path string, or None; unwraps a Hugging Face ``{bytes, path}`` image struct."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if value == b"" or (isinstance(value, str) and not value.strip()):
        return None
    return value  # type: ignore[return-value]


def _integer(name: str, value: object, kind: str) -> int:
    """``value`` as an int (bools refused), or a SourceError saying ``name`` must be ``kind``."""
    if isinstance(value, bool):
        raise SourceError(f"{name} must be {kind}, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise SourceError(f"{name} must be {kind}, got {value!r}") from None


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int within [low, high], or a SourceError that names the argument."""
    number = _integer(name, value, "an integer")
    if number < low or (high is not None and number > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise SourceError(f"{name} must be {bound}, got {number}")
    return number


def check_limit(name: str, value: object) -> int | None:
    """An optional positive integer parameter, or a SourceError naming it."""
    if value is None:
        return None
    number = _integer(name, value, "a positive integer")
    if number < 1:
        raise SourceError(f"{name} must be a positive integer, got {number}")
    return number


def check_text_param(name: str, value: object, required: bool = True) -> str | None:
    """A string parameter (a path or a column name), or a SourceError naming it."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SourceError(f"{name} must be a non-empty string, got {value!r}")
    return value


def split_of(path: str, split: object) -> str:
    """The split for a dataset file: ``split`` when given, else a split word in the file's name
    (``captions_val2017.json`` -> ``val``, ``train-00000-of-00014.parquet`` -> ``train``), else
    ``train``."""
    if split is not None:
        return check_text_param("split", split) or DEFAULT_SPLIT
    match = _SPLIT_WORD.search(os.path.basename(path.rstrip("/")).lower())
    return match.group(1) if match else DEFAULT_SPLIT


def read_bytes(path: str, what: str) -> bytes:
    """A whole (small) file's bytes, local or URI; ``SourceError`` naming it if unreadable."""
    try:
        fs, fs_path = filesystem_and_path(path)
        with fs.open_input_stream(fs_path) as f:
            return f.read()
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read {what} {path}: {one_line(e)}") from e


def check_folder(path: str, what: str) -> None:
    """Refuse a mistyped local folder once, instead of one quarantine row per file."""
    local = local_path(path)
    if local is not None and not os.path.isdir(local):
        raise SourceError(f"{what} {path} is not a folder")


def files_under(path: str, suffixes: tuple[str, ...], what: str) -> list[str]:
    """``path`` itself if it is a file, else the files under it ending in ``suffixes``
    (case-insensitive), sorted; ``SourceError`` if there is none."""
    try:
        fs, fs_path = filesystem_and_path(path)
        info = fs.get_file_info(fs_path)
        if info.type == pafs.FileType.File:
            return [path]
        if info.type != pafs.FileType.Directory:
            raise SourceError(f"{what} {path} does not exist")
        found = fs.get_file_info(pafs.FileSelector(fs_path, recursive=True))
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot list {what} {path}: {one_line(e)}") from e
    files = sorted(
        i.path
        for i in found
        if i.type == pafs.FileType.File
        and i.base_name.lower().endswith(suffixes)
        and not i.base_name.startswith((".", "_"))
    )
    if not files:
        raise SourceError(f"{what} {path} holds no {'/'.join(suffixes)} file")
    local = local_path(path)
    if local is None:  # a URI: give the files back with their scheme
        scheme = path.split("://", 1)[0]
        return [f"{scheme}://{f}" for f in files]
    return files


class Collector:
    """Item rows and quarantine rows of one dataset, built row by row."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.items: list[dict] = []
        self.quarantine: list[dict] = []

    def add(self, **item: object) -> None:
        self.items.append(item)

    def reject(
        self, item_id: str | None, modality: str | None, stage: str, reason: str, source: str
    ) -> None:
        self.quarantine.append(
            quarantine_row(
                dataset=self.dataset,
                item_id=item_id,
                modality=modality,
                stage=stage,
                reason=reason,
                source=source,
            )
        )

    def add_image_file(self, item: dict, path: str, root: str, source: str) -> bool:
        """An image item read later from ``path`` under ``root``: stat'ed here (exists,
        non-empty, inside the root), decoded in the pipeline. False if quarantined."""
        try:
            resolved = resolve_under_root(path, root)
        except ImageError as e:
            self.reject(item["item_id"], IMAGE, "validate", str(e), source)
            return False
        try:
            check_image_file(resolved)
        except ImageError as e:
            self.reject(item["item_id"], IMAGE, "read", str(e), source)
            return False
        self.add(**item, modality=IMAGE, image_path=resolved, source=source)
        return True

    def tables(self) -> tuple[pa.Table, pa.Table]:
        return items_table(self.items), quarantine_table(self.quarantine)
