"""Pick-a-Pic: prompts, pairs of generated images and a human's preference between them.

The Parquet files of ``yuvalkirstain/pickapic_v1``/``_v2`` (one file or a folder of shards)
have, per row (one ranking), ``caption``, ``jpg_0``/``jpg_1`` (JPEG bytes), ``label_0``/
``label_1`` (1/0 for a preference, 0.5/0.5 for a tie), ``image_0_uid``/``image_1_uid`` and
``ranking_id``; other columns (``user_id``, model names, ...) are ignored.

Items: one text item (role "caption") per distinct caption text, item id ``caption-HASH`` (a
hash of the text, so a prompt ranked many times is embedded once); one image item (role
"scene") per distinct image uid, item id the uid, bytes stored in ``image``, ``pair_id`` the
id of the caption it was generated from. Each ranking also becomes a forced-choice trial
(``vlray.items.TRIALS_SCHEMA``), direction ``text_to_image``: trial id the ranking id, query the
caption, choices the two images, the labels, and ``preferred`` the index of the image with the
higher label (null for a tie).

Pick-a-Pic has no image-to-caption labels, so ``image_to_text`` trials are derived: for each
ranking that is not a tie, the preferred image is the query and the choices are its own caption
and the caption of another ranking (one with a different caption, drawn at random), in a random
order; trial id ``RANKING/image_to_text``. Both draws come from one seeded numpy Generator, so the
same files, ``limit`` and seed give the same trials.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlray.errors import one_line
from vlray.hashing import content_hash
from vlray.images import filesystem_and_path
from vlray.items import IMAGE, TEXT, trials_table
from vlray.sources._common import (
    Collector,
    SourceError,
    check_int,
    check_limit,
    check_text_param,
    files_under,
    image_value,
    split_of,
    text_or_none,
)

log = logging.getLogger(__name__)

COLUMNS = (
    "ranking_id",
    "caption",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "image_0_uid",
    "image_1_uid",
)


def _open(path: str) -> pq.ParquetFile:
    try:
        fs, fs_path = filesystem_and_path(path)
        parquet = pq.ParquetFile(fs.open_input_file(fs_path))
    except (OSError, ValueError, pa.ArrowException) as e:
        raise SourceError(f"cannot read Pick-a-Pic file {path}: {one_line(e)}") from e
    missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise SourceError(
            f"Pick-a-Pic file {path} has no column {', '.join(map(repr, missing))} "
            f"(columns found: {', '.join(parquet.schema_arrow.names)})"
        )
    return parquet


def _label(value: object) -> float | None:
    """A preference label in [0, 1], or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


class _Builder:
    def __init__(self, dataset: str) -> None:
        self.out = Collector(dataset)
        self.captions: set[str] = set()  # caption item ids loaded
        self.images: dict[str, str] = {}  # uid -> source of the row that gave its bytes
        self.bad_images: dict[str, tuple[str, str]] = {}  # uid -> (reason, source)
        self.trials: list[dict] = []
        self.trial_rows: dict[str, str] = {}  # trial id -> source of its first row

    def add(self, row: dict, where: str, split: str) -> None:
        """One ranking: its caption and images as items (once each), and its trial."""
        ranking = text_or_none(row["ranking_id"])
        name = f"ranking_id {ranking}" if ranking else f"{where} (no ranking_id)"
        caption_id = self.add_caption(row["caption"], name, where, split)
        image_ids = [self.add_image(row, k, caption_id, name, where, split) for k in (0, 1)]
        if ranking is None:
            self.out.reject(None, None, "validate", f"{name}: no trial without a ranking_id", where)
            return
        if ranking in self.trial_rows:
            log.warning(
                "%s: ranking_id %s repeats (first at %s); kept the first",
                where,
                ranking,
                self.trial_rows[ranking],
            )
            return
        self.trial_rows[ranking] = where
        labels = [_label(row["label_0"]), _label(row["label_1"])]
        if None in labels or labels[0] + labels[1] == 0:
            reason = (
                f"{name}: label_0/label_1 are not a preference "
                f"(got {row['label_0']!r}, {row['label_1']!r}; expected values in [0, 1] "
                "such as 1/0 or 0.5/0.5)"
            )
            self.out.reject(ranking, None, "validate", reason, where)
            return
        if caption_id is None or None in image_ids:
            return  # the items are quarantined, with the reason, above
        preferred = None if labels[0] == labels[1] else int(labels[1] > labels[0])
        self.trials.append(
            {
                "trial_id": ranking,
                "direction": "text_to_image",
                "query_item_id": caption_id,
                "choice_item_ids": image_ids,
                "preferred": preferred,
                "label": labels,
                "split": split,
                "source": where,
            }
        )

    def add_caption(self, value: object, name: str, where: str, split: str) -> str | None:
        if not isinstance(value, str) or not value.strip():
            what = "is empty" if value is None or isinstance(value, str) else "is not text"
            reason = f"{name}: column 'caption' {what}"
            self.out.reject(f"{name}/caption", TEXT, "validate", reason, where)
            return None
        item_id = f"caption-{content_hash(value)}"
        if item_id not in self.captions:
            self.captions.add(item_id)
            self.out.add(
                item_id=item_id,
                modality=TEXT,
                pair_id=item_id,
                role="caption",
                split=split,
                text=value,
                source=where,
            )
        return item_id

    def add_image(
        self, row: dict, k: int, caption_id: str | None, name: str, where: str, split: str
    ) -> str | None:
        uid = text_or_none(row[f"image_{k}_uid"])
        data = image_value(row[f"jpg_{k}"])
        if uid is None:
            reason = f"{name}: column 'image_{k}_uid' is empty"
            self.out.reject(f"{name}/image_{k}", IMAGE, "validate", reason, where)
            return None
        if uid in self.images:
            return uid
        if not isinstance(data, bytes):
            what = "has no image bytes" if data is None else "holds a path, not image bytes"
            self.bad_images.setdefault(uid, (f"{name}: column 'jpg_{k}' {what}", where))
            return uid  # another row may still carry the bytes of this image
        self.images[uid] = where
        self.out.add(
            item_id=uid,
            modality=IMAGE,
            pair_id=caption_id,
            role="scene",
            split=split,
            image=data,
            source=f"{where}:jpg_{k}",
        )
        return uid

    def finish(self, seed: int) -> tuple[pa.Table, pa.Table, dict[str, pa.Table]]:
        for uid, (reason, where) in self.bad_images.items():
            if uid not in self.images:
                self.out.reject(uid, IMAGE, "validate", reason, where)
        trials = [t for t in self.trials if all(i in self.images for i in t["choice_item_ids"])]
        items, quarantine = self.out.tables()
        trials += _image_to_text(trials, np.random.default_rng(seed))
        return items, quarantine, {"trials": trials_table(trials)}


def _image_to_text(trials: list[dict], rng: np.random.Generator) -> list[dict]:
    """Derived image-to-caption trials: each non-tie ranking's preferred image, choosing between
    its own caption (label 1) and another ranking's different caption (label 0)."""
    captions = [t["query_item_id"] for t in trials]
    if len(set(captions)) < 2:
        return []  # a single prompt: no other caption to set against it
    out = []
    for t in trials:
        if t["preferred"] is None:
            continue  # a tie names no image that goes with the caption better
        while True:  # rejection: uniform over the rankings whose caption differs
            other = captions[int(rng.integers(0, len(captions)))]
            if other != t["query_item_id"]:
                break
        order = rng.permutation(2)  # choice k is candidate order[k]; candidate 0 is the own caption
        candidates = [t["query_item_id"], other]
        out.append(
            {
                "trial_id": f"{t['trial_id']}/image_to_text",
                "direction": "image_to_text",
                "query_item_id": t["choice_item_ids"][t["preferred"]],
                "choice_item_ids": [candidates[k] for k in order],
                "preferred": int(np.flatnonzero(order == 0)[0]),
                "label": [1.0 if k == 0 else 0.0 for k in order],
                "split": t["split"],
                "source": t["source"],
            }
        )
    return out


def load_pickapic(
    dataset: str,
    path: str,
    split: str | None = None,
    limit: int | None = None,
    image_to_text_seed: int = 0,
) -> tuple[pa.Table, pa.Table, dict[str, pa.Table]]:
    """Load Pick-a-Pic Parquet (a file or a folder of shards) into items, quarantine rows and a
    ``trials`` table.

    ``split`` defaults to the split word of each file's name (``validation_unique-...``,
    ``train-00000-of-00645.parquet``), else ``train``. ``limit`` keeps the first ``limit``
    rankings. A file that cannot be read or lacks a column raises ``SourceError`` naming the
    file and the column. A row with an empty caption or uid, or missing image bytes,
    quarantines that item (stage "validate", the reason names the ranking id and the column)
    and gives no trial; a row whose labels are not a preference gives no trial and a
    quarantine row with modality null. Ties are trials with ``preferred`` null.

    Besides these ``text_to_image`` trials, every non-tie ranking gives a derived
    ``image_to_text`` trial (see the module docstring); ``image_to_text_seed`` (an integer >= 0)
    seeds the draw of its other caption and the order of its two choices. A dataset with a
    single distinct caption gives none.
    """
    path = check_text_param("path", path) or ""
    limit = check_limit("limit", limit)
    seed = check_int("image_to_text_seed", image_to_text_seed, 0)
    builder = _Builder(dataset)
    n = 0
    for file in files_under(path, (".parquet",), "Pick-a-Pic data"):
        file_split = split_of(file, split)
        parquet = _open(file)
        row_number = 0
        for batch in parquet.iter_batches(batch_size=256, columns=list(COLUMNS)):
            for row in batch.to_pylist():
                if limit is not None and n >= limit:
                    return builder.finish(seed)
                row_number += 1
                n += 1
                builder.add(row, f"{file}:row {row_number}", file_split)
    return builder.finish(seed)
