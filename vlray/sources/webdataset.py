"""WebDataset tar shards: samples of ``KEY.jpg`` (or .jpeg/.png/.webp) + ``KEY.txt`` members.

A sample is the run of consecutive members sharing a key: the member's path up to the first
``.`` of its file name (``shard/000123.jpg`` -> key ``shard/000123``, extension ``jpg``), as
the ``webdataset`` library groups them. Each sample becomes an image item (role "scene",
bytes in ``image``) and a caption item (role "caption", from ``.txt``, ``.caption`` or
``.text``), both with item id and ``pair_id`` the key. Members are read with Python's
``tarfile`` as a stream and never extracted, so member names cannot write anywhere.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator

import pyarrow as pa

from vlray.errors import one_line
from vlray.images import filesystem_and_path
from vlray.items import IMAGE, TEXT
from vlray.sources._common import (
    Collector,
    SourceError,
    check_limit,
    check_text_param,
    files_under,
    split_of,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "caption", "text")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def samples(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each sample of a shard, in order.

    Raises ``SourceError`` naming the shard if it cannot be read as a tar archive.
    """
    key, parts = None, {}
    try:
        fs, fs_path = filesystem_and_path(shard)
        with fs.open_input_stream(fs_path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                base = posixpath.basename(member.name)
                stem, dot, ext = base.partition(".")
                if not member.isfile() or base.startswith(".") or not dot:
                    continue
                member_key = posixpath.join(posixpath.dirname(member.name), stem)
                if member_key != key:
                    if key is not None:
                        yield key, parts
                    key, parts = member_key, {}
                extracted = tar.extractfile(member)
                parts[ext.lower()] = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise SourceError(f"cannot read WebDataset shard {shard}: {one_line(e)}") from e
    if key is not None:
        yield key, parts


def _first(parts: dict[str, bytes], exts: tuple[str, ...]) -> tuple[str, bytes] | None:
    for ext in exts:
        if ext in parts:
            return ext, parts[ext]
    return None


def load_webdataset(
    dataset: str,
    path: str,
    split: str | None = None,
    limit: int | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Load WebDataset shards (one ``.tar``/``.tar.gz``/``.tgz`` file, or a folder of them, in
    name order) into items and quarantine rows.

    ``split`` defaults to the split word of each shard's name, else ``train``; ``limit`` keeps
    the first ``limit`` samples. An unreadable shard raises ``SourceError``. A sample without
    an image or caption member, with an empty one, a caption that is not UTF-8, or a key seen
    before quarantines the items it spoils; the reason names the shard and the key.
    """
    path = check_text_param("path", path) or ""
    limit = check_limit("limit", limit)
    out = Collector(dataset)
    first: dict[str, str] = {}
    n = 0
    for shard in files_under(path, SHARD_SUFFIXES, "WebDataset shards"):
        shard_split = split_of(shard, split)
        for key, parts in samples(shard):
            if limit is not None and n >= limit:
                return out.tables()
            n += 1
            where = f"{shard}:{key}"
            if key in first:
                reason = f"sample {key} repeats (first in {first[key]})"
                for modality in (IMAGE, TEXT):
                    out.reject(key, modality, "validate", reason, where)
                continue
            first[key] = shard
            common = {"item_id": key, "pair_id": key, "split": shard_split}
            image = _first(parts, IMAGE_EXTS)
            if image is None or not image[1]:
                what = (
                    "no image member (.jpg/.jpeg/.png/.webp)"
                    if image is None
                    else (f"an empty {key}.{image[0]}")
                )
                out.reject(key, IMAGE, "validate", f"sample {key} has {what}", where)
            else:
                out.add(
                    **common,
                    modality=IMAGE,
                    role="scene",
                    image=image[1],
                    source=f"{where}.{image[0]}",
                )
            _add_text(out, common, parts, where)
    return out.tables()


def _add_text(out: Collector, common: dict, parts: dict[str, bytes], where: str) -> None:
    key = common["item_id"]
    found = _first(parts, TEXT_EXTS)
    if found is None:
        out.reject(key, TEXT, "validate", f"sample {key} has no .txt member", where)
        return
    ext, data = found
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        out.reject(key, TEXT, "decode", f"{key}.{ext} is not UTF-8: {one_line(e)}", where)
        return
    if not text:
        out.reject(key, TEXT, "validate", f"sample {key} has an empty {key}.{ext}", where)
        return
    out.add(**common, modality=TEXT, role="caption", text=text, source=f"{where}.{ext}")
