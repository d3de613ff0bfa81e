"""User datasets: a manifest file listing images and their captions.

A manifest is JSONL (``.jsonl``, or ``.json`` holding JSON lines or one JSON array), CSV or
Parquet, with columns ``item_id``, ``image``, ``caption`` and optionally ``concept`` and
``split``. ``image`` is a path relative to the dataset root (or a URI under it); in Parquet it
may also hold the encoded bytes, or a Hugging Face ``datasets`` image struct ``{bytes, path}``.

Each row becomes an image item (role "scene") and a text item (role "caption") that share
``item_id`` and ``pair_id``. Whole-file problems raise ``ManifestError``; a bad row only
quarantines the items it spoils, so for each modality: rows = items + quarantined. Image
files are only stat'ed here (exists, non-empty, inside the root); decoding happens later.
Rows are numbered from 1, not counting a CSV header.
"""

from __future__ import annotations

import io
import json
import os

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from vlray.errors import VlrayError, one_line
from vlray.images import (
    filesystem_and_path,
    local_path,
)
from vlray.items import IMAGE, TEXT
from vlray.sources._common import Collector, image_value, text_or_none

REQUIRED_COLUMNS = ("item_id", "image", "caption")
OPTIONAL_COLUMNS = ("concept", "split")
DEFAULT_SPLIT = "train"


class ManifestError(VlrayError, ValueError):
    """A manifest that cannot be used at all; the message names the file (and column)."""


# --------------------------------------------------------------------------- reading


def _read_bytes(path: str) -> bytes:
    try:
        fs, fs_path = filesystem_and_path(path)
        with fs.open_input_stream(fs_path) as f:
            return f.read()
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read manifest {path}: {one_line(e)}") from e


def _check_columns(path: str, columns: list[str]) -> list[str]:
    """Raise if a required column is missing; return the known columns present."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"manifest {path} has no required column {', '.join(map(repr, missing))} "
            f"(columns found: {', '.join(columns) or 'none'})"
        )
    return [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in columns]


def _frame_rows(path: str, frame: pl.DataFrame) -> list[dict]:
    return frame.select(_check_columns(path, frame.columns)).to_dicts()


def _read_csv(path: str) -> list[dict]:
    data = _read_bytes(path)
    try:
        # Every column as text: ids such as "007" must not become the integer 7.
        frame = pl.read_csv(io.BytesIO(data), infer_schema=False)
    except Exception as e:  # polars raises its own error types for malformed files
        raise ManifestError(f"cannot parse CSV manifest {path}: {one_line(e)}") from e
    return _frame_rows(path, frame)


def _read_json(path: str) -> list[dict]:
    data = _read_bytes(path)
    try:
        if data.lstrip()[:1] == b"[":
            frame = pl.read_json(io.BytesIO(data), infer_schema_length=None)
        else:
            frame = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
    except Exception as e:  # polars raises its own error types for malformed files
        where = _json_problem(data)  # polars names only a character offset, not the line
        problem = f" {where}" if where else f": {one_line(e)}"
        raise ManifestError(f"cannot parse JSON manifest {path}{problem}") from e
    return _frame_rows(path, frame)


def _json_problem(data: bytes) -> str | None:
    """``line N: what is wrong`` for the first bad line of a JSON array or JSON lines file
    (lines numbered from 1), or None if Python's parser finds nothing wrong."""
    if data.lstrip()[:1] == b"[":
        try:
            json.loads(data)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: {e.msg} at column {e.colno}"
        except UnicodeDecodeError as e:
            n = data[: e.start].count(b"\n") + 1
            return f"line {n}: not UTF-8 text: {one_line(e)}"
        return None
    for n, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n}: {e.msg} at column {e.colno}"
        except UnicodeDecodeError as e:
            return f"line {n}: not UTF-8 text: {one_line(e)}"
        if not isinstance(row, dict):
            text = line.decode("utf-8", "replace").strip()
            return f"line {n}: expected a JSON object, got {text!r:.80}"
    return None


def _read_parquet(path: str) -> list[dict]:
    try:
        fs, fs_path = filesystem_and_path(path)
        parquet = pq.ParquetFile(fs.open_input_file(fs_path))
        columns = _check_columns(path, parquet.schema_arrow.names)
        table = parquet.read(columns=columns)
    except ManifestError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ManifestError(f"cannot read Parquet manifest {path}: {one_line(e)}") from e
    return table.to_pylist()


_READERS = {".jsonl": _read_json, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_manifest_rows(path: str) -> list[dict]:
    """The manifest's rows as dicts with only the known columns; raises ``ManifestError``."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _READERS:
        raise ManifestError(
            f"manifest {path}: unknown extension {ext or '(none)'!r}; "
            f"expected one of {', '.join(sorted(_READERS))}"
        )
    return _READERS[ext](path)


# --------------------------------------------------------------------------- rows


class _Builder:
    """Turns manifest rows into item rows and quarantine rows."""

    def __init__(self, path: str, root: str, dataset: str) -> None:
        self.path, self.root = path, root
        self.out = Collector(dataset)
        self.first_row: dict[str, int] = {}  # item_id -> row of its first occurrence
        self.root_checked = False

    def source(self, n: int) -> str:
        return f"{self.path}:row {n}"

    def reject(self, n: int, item_id: str, modality: str, stage: str, reason: str) -> None:
        self.out.reject(item_id, modality, stage, reason, self.source(n))

    def add(self, n: int, row: dict) -> None:
        """One manifest row: both items, or quarantine rows for the parts that are bad."""
        item_id = text_or_none(row.get("item_id"))
        if item_id is None:
            for modality in (IMAGE, TEXT):
                self.reject(n, f"row-{n}", modality, "validate", "missing or empty item_id")
            return
        if item_id in self.first_row:
            reason = f"duplicate item_id {item_id!r} (first used at row {self.first_row[item_id]})"
            for modality in (IMAGE, TEXT):
                self.reject(n, item_id, modality, "validate", reason)
            return
        self.first_row[item_id] = n
        common = {
            "item_id": item_id,
            "pair_id": item_id,
            "concept": text_or_none(row.get("concept")),
            "split": text_or_none(row.get("split")) or DEFAULT_SPLIT,
            "source": self.source(n),
        }
        self.add_image(n, common, image_value(row.get("image")))
        self.add_text(n, common, row.get("caption"))

    def add_text(self, n: int, common: dict, caption: object) -> None:
        item_id = common["item_id"]
        if caption is None or (isinstance(caption, str) and not caption.strip()):
            self.reject(n, item_id, TEXT, "validate", "empty caption")
        elif not isinstance(caption, str):
            self.reject(n, item_id, TEXT, "validate", f"caption is not text: {caption!r:.80}")
        else:
            self.out.add(**common, modality=TEXT, role="caption", text=caption)

    def add_image(self, n: int, common: dict, image: object) -> None:
        item_id = common["item_id"]
        if image is None:  # image_value makes empty bytes and blank paths None
            self.reject(n, item_id, IMAGE, "validate", "image is missing (null or empty)")
        elif isinstance(image, bytes):
            self.out.add(**common, modality=IMAGE, role="scene", image=image)
        elif not isinstance(image, str):
            kind = type(image).__name__
            self.reject(n, item_id, IMAGE, "validate", f"image must be a path or bytes, not {kind}")
        else:
            self.check_root()
            item = {k: v for k, v in common.items() if k != "source"}
            # stat only (exists, non-empty, inside the root); decoding happens in the pipeline
            self.out.add_image_file({**item, "role": "scene"}, image, self.root, self.source(n))

    def check_root(self) -> None:
        """A mistyped local root is one whole-file error, not one quarantine row per image."""
        if self.root_checked:
            return
        self.root_checked = True
        local = local_path(self.root)
        if local is not None and not os.path.isdir(local):
            raise ManifestError(f"manifest {self.path}: dataset root {self.root} is not a folder")


def load_manifest(path: str, root: str, dataset: str) -> tuple[pa.Table, pa.Table]:
    """Read a manifest into (items with ITEMS_SCHEMA, quarantine with QUARANTINE_SCHEMA)."""
    builder = _Builder(path, root, dataset)
    for n, row in enumerate(read_manifest_rows(path), start=1):
        builder.add(n, row)
    return builder.out.tables()
