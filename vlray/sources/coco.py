"""COCO-style captions: ``annotations/captions_*.json`` plus a folder of images.

The JSON holds ``images`` (``[{id, file_name, width, height}, ...]``) and ``annotations``
(``[{image_id, id, caption}, ...]``), as in COCO Captions, Flickr30k/Nocaps exports and
Karpathy-split conversions. Each image becomes an image item (role "scene", item id the COCO
image id) and each caption a text item (role "caption", item id ``IMAGE_ID#cANNOTATION_ID``,
or ``IMAGE_ID#kK`` for the K-th caption of an image when annotations carry no id); they share
``pair_id`` = the image id, so alignment pairs an image with the mean of its captions.
"""

from __future__ import annotations

import json

import pyarrow as pa

from vlray.errors import one_line
from vlray.items import IMAGE, TEXT
from vlray.sources._common import (
    Collector,
    SourceError,
    check_folder,
    check_limit,
    check_text_param,
    read_bytes,
    split_of,
)


def _id_of(value: object) -> str | None:
    """A COCO id (int, or a non-empty string) as text; None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _read_captions(path: str) -> tuple[list, list]:
    data = read_bytes(path, "captions file")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot parse captions file {path} as JSON: {one_line(e)}") from e
    if not isinstance(doc, dict):
        raise SourceError(
            f"captions file {path}: expected a JSON object with 'images' and "
            f"'annotations', got {type(doc).__name__}"
        )
    for key in ("images", "annotations"):
        if not isinstance(doc.get(key), list):
            found = ", ".join(map(repr, doc)) or "none"
            raise SourceError(f"captions file {path} has no list '{key}' (keys found: {found})")
    return doc["images"], doc["annotations"]


def load_coco(
    dataset: str,
    captions: str,
    root: str,
    split: str | None = None,
    limit: int | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Load a COCO-style captions file and its image folder into items and quarantine rows.

    ``captions`` is the JSON file (local path or URI), ``root`` the folder that ``file_name``
    is relative to (paths are resolved under it and never leave it). ``split`` defaults to the
    split word in the captions file name (``captions_val2017.json`` -> ``val``), else
    ``train``. ``limit`` keeps the first ``limit`` images of the file and their captions.

    A file that cannot be read or lacks ``images``/``annotations`` raises ``SourceError``. Bad
    entries only quarantine their own item: an image entry without ``id``/``file_name`` or with
    a duplicate id (stage "validate"), a missing or empty image file (stage "read", the reason
    names the file), a path escaping the root ("validate"), a caption that is empty, not text,
    a duplicate annotation id, or names an image id the file does not list ("validate").
    Image files are only stat'ed here; they are decoded by the pipeline.
    """
    captions = check_text_param("captions", captions) or ""
    root = check_text_param("root", root) or ""
    limit = check_limit("limit", limit)
    split = split_of(captions, split)
    images, annotations = _read_captions(captions)
    check_folder(root, "image folder (root)")

    out = Collector(dataset)
    all_ids: set[str] = set()
    kept: dict[str, int] = {}  # image id -> index of its entry, for the images loaded
    for i, entry in enumerate(images):
        where = f"{captions}:images[{i}]"
        image_id = _id_of(entry.get("id")) if isinstance(entry, dict) else None
        if image_id is None:
            reason = f"images[{i}] has no usable 'id' (an integer or a string)"
            out.reject(f"images[{i}]", IMAGE, "validate", reason, where)
            continue
        if image_id in all_ids:
            if image_id in kept:
                reason = f"duplicate image id {image_id} (first at images[{kept[image_id]}])"
                out.reject(image_id, IMAGE, "validate", reason, where)
            continue
        all_ids.add(image_id)
        if limit is not None and len(kept) >= limit:
            continue
        kept[image_id] = i
        file_name = entry.get("file_name")
        item = {"item_id": image_id, "pair_id": image_id, "role": "scene", "split": split}
        if not isinstance(file_name, str) or not file_name.strip():
            reason = f"image {image_id} (images[{i}]) has no 'file_name'"
            out.reject(image_id, IMAGE, "validate", reason, where)
            continue
        out.add_image_file(item, file_name, root, where)

    seen_annotations: dict[str, int] = {}
    per_image: dict[str, int] = {}
    for j, ann in enumerate(annotations):
        where = f"{captions}:annotations[{j}]"
        image_id = _id_of(ann.get("image_id")) if isinstance(ann, dict) else None
        if image_id is not None and image_id in all_ids and image_id not in kept:
            continue  # an image left out by `limit`
        if image_id is None or image_id not in all_ids:
            ref = "no usable 'image_id'" if image_id is None else f"image_id {image_id}"
            reason = f"annotations[{j}] has {ref}, which is not in the file's images"
            out.reject(f"annotations[{j}]", TEXT, "validate", reason, where)
            continue
        ann_id = _id_of(ann.get("id"))
        if ann_id is not None:
            item_id = f"{image_id}#c{ann_id}"
        else:
            item_id = f"{image_id}#k{per_image.get(image_id, 0)}"
            per_image[image_id] = per_image.get(image_id, 0) + 1
        if item_id in seen_annotations:
            first = seen_annotations[item_id]
            reason = f"duplicate annotation id {ann_id} (first at annotations[{first}])"
            out.reject(item_id, TEXT, "validate", reason, where)
            continue
        seen_annotations[item_id] = j
        caption = ann.get("caption")
        if not isinstance(caption, str):
            reason = f"annotations[{j}] caption is not text: {caption!r:.80}"
            out.reject(item_id, TEXT, "validate", reason, where)
        elif not caption.strip():
            out.reject(item_id, TEXT, "validate", f"annotations[{j}] has an empty caption", where)
        else:
            out.add(
                item_id=item_id,
                modality=TEXT,
                pair_id=image_id,
                role="caption",
                split=split,
                text=caption.strip(),
                source=where,
            )
    return out.tables()
