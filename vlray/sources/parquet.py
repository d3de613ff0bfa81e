"""Generic Parquet: one row per image with its caption(s), as Hugging Face ``datasets`` and
WebDataset-to-Parquet exports store them (e.g. the 1,024 WIT pairs of the Platonic
Representation Hypothesis).

The image column holds encoded bytes, a Hugging Face image struct ``{bytes, path}``, or a path
relative to ``root``; the text column holds a caption or a list of captions. Each row becomes
an image item (role "scene") and its caption item(s) (role "caption") with one ``pair_id``:
the row's id (``id_column``, else ``row-N`` counting rows from 1 across the files in name
order). A single caption shares the image's item id; a list gives ``ID#cK`` for its K-th text.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from vlray.errors import one_line
from vlray.images import filesystem_and_path
from vlray.items import IMAGE, TEXT
from vlray.sources._common import (
    Collector,
    SourceError,
    check_folder,
    check_limit,
    check_text_param,
    files_under,
    image_value,
    split_of,
    text_or_none,
)


def _open(path: str, columns: list[str]) -> pq.ParquetFile:
    try:
        fs, fs_path = filesystem_and_path(path)
        parquet = pq.ParquetFile(fs.open_input_file(fs_path))
    except (OSError, ValueError, pa.ArrowException) as e:
        raise SourceError(f"cannot read Parquet file {path}: {one_line(e)}") from e
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise SourceError(
            f"Parquet file {path} has no column {', '.join(map(repr, missing))} "
            f"(columns found: {', '.join(names)})"
        )
    return parquet


class _Builder:
    def __init__(self, dataset: str, image_column: str, text_column: str, root: str | None) -> None:
        self.out = Collector(dataset)
        self.image_column, self.text_column, self.root = image_column, text_column, root
        self.first: dict[str, str] = {}  # item id -> source of its first row

    def add(self, item_id: str | None, n: int, row: dict, where: str, split: str) -> None:
        """Row ``n`` (counted across files): its image and caption items, or quarantine rows."""
        if item_id is None:
            reason = f"{where}: the id column is empty"
            for modality in (IMAGE, TEXT):
                self.out.reject(f"row-{n}", modality, "validate", reason, where)
            return
        if item_id in self.first:
            reason = f"duplicate id {item_id!r} (first at {self.first[item_id]})"
            for modality in (IMAGE, TEXT):
                self.out.reject(item_id, modality, "validate", reason, where)
            return
        self.first[item_id] = where
        common = {"item_id": item_id, "pair_id": item_id, "split": split}
        self.add_image(common, row[self.image_column], where)
        self.add_texts(common, row[self.text_column], where)

    def add_image(self, common: dict, value: object, where: str) -> None:
        item_id, column = common["item_id"], self.image_column
        image = image_value(value)
        item = {**common, "role": "scene"}
        if isinstance(image, bytes):
            self.out.add(**item, modality=IMAGE, image=image, source=f"{where}:{column}")
        elif image is None:
            reason = f"{where}: column '{column}' has no image (null or empty)"
            self.out.reject(item_id, IMAGE, "validate", reason, where)
        elif not isinstance(image, str):
            kind = type(image).__name__
            reason = f"{where}: column '{column}' holds {kind}, not image bytes or a path"
            self.out.reject(item_id, IMAGE, "validate", reason, where)
        elif self.root is None:
            reason = f"{where}: column '{column}' holds a path ({image!r}) but no root was given"
            self.out.reject(item_id, IMAGE, "validate", reason, where)
        else:
            self.out.add_image_file(item, image, self.root, where)

    def add_texts(self, common: dict, value: object, where: str) -> None:
        column = self.text_column
        if isinstance(value, list):
            for k, text in enumerate(value):
                self.add_text({**common, "item_id": f"{common['item_id']}#c{k}"}, text, where)
            if not value:
                reason = f"{where}: column '{column}' is an empty list"
                self.out.reject(common["item_id"], TEXT, "validate", reason, where)
        else:
            self.add_text(common, value, where)

    def add_text(self, item: dict, text: object, where: str) -> None:
        column = self.text_column
        if text is None or (isinstance(text, str) and not text.strip()):
            reason = f"{where}: column '{column}' is empty"
            self.out.reject(item["item_id"], TEXT, "validate", reason, where)
        elif not isinstance(text, str):
            reason = f"{where}: column '{column}' is not text: {text!r:.80}"
            self.out.reject(item["item_id"], TEXT, "validate", reason, where)
        else:
            self.out.add(
                **item,
                modality=TEXT,
                role="caption",
                text=text.strip(),
                source=f"{where}:{column}",
            )


def load_parquet(
    dataset: str,
    path: str,
    image_column: str = "image",
    text_column: str = "caption",
    id_column: str | None = None,
    root: str | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Load image/caption pairs from Parquet (a file or a folder of ``.parquet`` files).

    ``image_column`` holds bytes, a ``{bytes, path}`` struct or a path under ``root``
    (required only for paths); ``text_column`` a caption or a list of captions; ``id_column``
    (optional) the row's id. ``split`` defaults to the split word of each file's name, else
    ``train``; ``limit`` keeps the first ``limit`` rows. A file that cannot be read or lacks a
    named column raises ``SourceError`` naming file and column; a bad row quarantines only the
    items it spoils (stage "validate"; missing image files "read"), the reason naming the file,
    row and column.
    """
    path = check_text_param("path", path) or ""
    image_column = check_text_param("image_column", image_column) or ""
    text_column = check_text_param("text_column", text_column) or ""
    id_column = check_text_param("id_column", id_column, required=False)
    root = check_text_param("root", root, required=False)
    limit = check_limit("limit", limit)
    if root is not None:
        check_folder(root, "image folder (root)")
    columns = list(dict.fromkeys(c for c in (id_column, image_column, text_column) if c))
    builder = _Builder(dataset, image_column, text_column, root)
    n = 0
    for file in files_under(path, (".parquet",), "Parquet data"):
        file_split = split_of(file, split)
        parquet = _open(file, columns)
        row_number = 0
        for batch in parquet.iter_batches(batch_size=256, columns=columns):
            for row in batch.to_pylist():
                if limit is not None and n >= limit:
                    return builder.out.tables()
                row_number += 1
                n += 1
                item_id = text_or_none(row[id_column]) if id_column else f"row-{n}"
                builder.add(item_id, n, row, f"{file}:row {row_number}", file_split)
    return builder.out.tables()
