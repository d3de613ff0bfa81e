"""Concept image folders (ImageNet style) with a word list and in-context sentences.

```
ROOT/CONCEPT/*.jpg|jpeg|png|webp|bmp|gif|tif|tiff     one folder per concept (e.g. n01440764)
words.csv (or .tsv)    concept,word,aliases[,frequency][,polysemy]     header row required
sentences.tsv (or .csv, .jsonl)   word,sentence[,concept]              header row required
```

The word list maps a concept folder to the word that names it and its aliases, separated by
``|`` (``n02084071,dog,domestic dog|Canis familiaris``); the word itself is always the first
alias. ``frequency`` (a number, e.g. occurrences per million) and ``polysemy`` (an integer,
e.g. the number of WordNet senses) are optional columns for the retrieval study's breakdowns.
The sentences file gives in-context sentences for concept words; a ``concept`` column, when
present, says which concept a sentence belongs to (else every concept named by that word).

Items: one image per file (role "exemplar", ``concept`` the folder name, item id
``CONCEPT/FILE``) and one text per sentence (role "context", ``word`` the concept word, item id
``ctx-CONCEPT-K``), embedded with word-span pooling. The ``concepts`` table
(``vlray.items.CONCEPTS_SCHEMA``) keeps each concept's word, aliases and statistics.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os

import pyarrow as pa
import pyarrow.fs as pafs

from vlray.errors import one_line
from vlray.images import filesystem_and_path
from vlray.items import IMAGE, TEXT, concepts_table
from vlray.sources._common import (
    IMAGE_EXTENSIONS,
    Collector,
    SourceError,
    check_folder,
    check_limit,
    check_text_param,
    read_bytes,
)

log = logging.getLogger(__name__)

ALIAS_SEPARATOR = "|"


# --------------------------------------------------------------------------- files


def _read_table(path: str, what: str, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """Rows of a CSV/TSV (header row) or JSONL file as ``(row number, dict)``; rows are
    numbered from 1, not counting a header. Raises ``SourceError`` naming file and column."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".tsv", ".jsonl", ".json"):
        raise SourceError(
            f"{what} {path}: unknown extension {ext or '(none)'!r}; expected .csv, .tsv or .jsonl"
        )
    data = read_bytes(path, what)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{what} {path} is not UTF-8 text: {one_line(e)}") from e
    rows: list[tuple[int, dict]] = []
    if ext in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise SourceError(f"{what} {path}: row {n} is not JSON: {one_line(e)}") from e
            if not isinstance(row, dict):
                raise SourceError(f"{what} {path}: row {n} is not a JSON object")
            rows.append((n, row))
        columns = sorted({k for _, r in rows for k in r})
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if ext == ".tsv" else ",")
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        for n, row in enumerate(reader, start=1):
            if any(isinstance(v, str) and v.strip() for v in row.values()):
                rows.append((n, row))
    missing = [c for c in required if c not in columns]
    if missing and (rows or ext in (".csv", ".tsv")):
        raise SourceError(
            f"{what} {path} has no column {', '.join(map(repr, missing))} "
            f"(columns found: {', '.join(columns) or 'none'})"
        )
    return rows


def _number(path: str, n: int, column: str, value: object, integer: bool) -> float | int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
        if not math.isfinite(number) or (integer and number != int(number)):
            raise ValueError(value)
    except (TypeError, ValueError):
        kind = "an integer" if integer else "a number"
        raise SourceError(
            f"words file {path}: row {n}, column '{column}': expected {kind}, got {value!r}"
        ) from None
    return int(number) if integer else number


def _aliases(word: str, value: object) -> list[str]:
    parts = value if isinstance(value, list) else str(value or "").split(ALIAS_SEPARATOR)
    out = [word]
    for alias in (str(p).strip() for p in parts):
        if alias and alias not in out:
            out.append(alias)
    return out


def read_words(path: str) -> dict[str, dict]:
    """The word list: concept -> concept row (``CONCEPTS_SCHEMA``). Raises ``SourceError``."""
    concepts: dict[str, dict] = {}
    first: dict[str, int] = {}
    for n, row in _read_table(path, "words file", ("concept", "word")):
        concept, word = (str(row.get(c) or "").strip() for c in ("concept", "word"))
        if not concept or not word:
            column = "concept" if not concept else "word"
            raise SourceError(f"words file {path}: row {n}, column '{column}' is empty")
        if concept in concepts:
            raise SourceError(
                f"words file {path}: row {n}: concept {concept!r} repeats (first at row "
                f"{first[concept]})"
            )
        first[concept] = n
        concepts[concept] = {
            "concept": concept,
            "word": word,
            "aliases": _aliases(word, row.get("aliases")),
            "frequency": _number(path, n, "frequency", row.get("frequency"), False),
            "polysemy": _number(path, n, "polysemy", row.get("polysemy"), True),
            "source": f"{path}:row {n}",
        }
    if not concepts:
        raise SourceError(f"words file {path} lists no concept")
    return concepts


def _list_dir(root: str) -> list[pafs.FileInfo]:
    try:
        fs, fs_path = filesystem_and_path(root)
        return sorted(
            fs.get_file_info(pafs.FileSelector(fs_path, recursive=False)), key=lambda i: i.path
        )
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot list {root}: {one_line(e)}") from e


def _concept_folders(root: str) -> list[str]:
    return [
        i.base_name
        for i in _list_dir(root)
        if i.type == pafs.FileType.Directory and not i.base_name.startswith((".", "_"))
    ]


def _image_names(root: str, concept: str) -> list[str]:
    folder = root.rstrip("/") + "/" + concept
    return [
        i.base_name
        for i in _list_dir(folder)
        if i.type == pafs.FileType.File
        and i.base_name.lower().endswith(IMAGE_EXTENSIONS)
        and not i.base_name.startswith(".")
    ]


def _contains(text: str, word: str) -> bool:
    """As the tokeniser finds the target word: exact, else case-insensitive."""
    return word in text or word.lower() in text.lower()


# --------------------------------------------------------------------------- loader


def load_imagefolder(
    dataset: str,
    root: str,
    words: str | None = None,
    sentences: str | None = None,
    split: str = "train",
    images_per_concept: int | None = None,
    sentences_per_concept: int | None = None,
) -> tuple[pa.Table, pa.Table, dict[str, pa.Table]]:
    """Load concept folders, a word list and in-context sentences into items, quarantine rows
    and a ``concepts`` table.

    ``root`` holds one folder per concept; ``words`` (CSV/TSV/JSONL, optional) maps folder
    names to words and ``|``-separated aliases; without it a folder's name, ``_`` read as a
    space, is its word. With a word list, only the folders it lists are loaded: the images of
    a folder it does not list are quarantined at stage "validate", and a listed concept
    without a folder is left out, with a warning. ``sentences`` (CSV/TSV/JSONL,
    optional) has ``word`` and ``sentence`` columns, optionally ``concept``.
    ``images_per_concept`` and ``sentences_per_concept`` keep the first ones (files in name
    order, sentences in file order).

    Whole-file problems (unreadable or malformed word list or sentences file, a missing
    column, a repeated concept, a bad number) raise ``SourceError``. An image file that is
    empty or escapes the root through a link is quarantined; a sentence that does not contain
    its concept word, names no loaded concept, or is empty is quarantined at stage "validate".
    """
    root = check_text_param("root", root) or ""
    words = check_text_param("words", words, required=False)
    sentences = check_text_param("sentences", sentences, required=False)
    split = check_text_param("split", split) or "train"
    images_per_concept = check_limit("images_per_concept", images_per_concept)
    sentences_per_concept = check_limit("sentences_per_concept", sentences_per_concept)
    check_folder(root, "image folder (root)")

    folders = _concept_folders(root)
    if words is not None:
        listed = read_words(words)
        absent = [c for c in listed if c not in folders]
        if absent:
            log.warning(
                "words file %s: %d concept(s) have no folder under %s and are left out: %s",
                words,
                len(absent),
                root,
                ", ".join(absent[:10]),
            )
        concepts = {c: listed[c] for c in folders if c in listed}
        if not concepts:
            raise SourceError(f"no folder under {root} is a concept of the words file {words}")
        unlisted = [c for c in folders if c not in listed]
    else:
        unlisted = []
        concepts = {}
        for c in folders:
            word = " ".join(c.replace("_", " ").split())
            concepts[c] = {"concept": c, "word": word, "aliases": [word], "source": root}
    if not concepts:
        raise SourceError(f"image folder (root) {root} has no concept folder")

    out = Collector(dataset)
    for concept in concepts:
        names = _image_names(root, concept)[:images_per_concept]
        for name in names:
            item = {
                "item_id": f"{concept}/{name}",
                "pair_id": f"{concept}/{name}",
                "role": "exemplar",
                "concept": concept,
                "split": split,
            }
            out.add_image_file(item, f"{concept}/{name}", root, f"{root}:{concept}/{name}")
    # An unlisted folder has no word to align with; its images are refused, not lost, so that
    # rows in = embedded + quarantined still holds.
    for folder in unlisted:
        reason = f"folder {folder!r} is not listed in the words file {words}"
        for name in _image_names(root, folder)[:images_per_concept]:
            where = f"{root}:{folder}/{name}"
            out.reject(f"{folder}/{name}", IMAGE, "validate", reason, where)

    if sentences is not None:
        _add_sentences(out, sentences, concepts, split, sentences_per_concept)
    items, quarantine = out.tables()
    return items, quarantine, {"concepts": concepts_table(list(concepts.values()))}


def _add_sentences(
    out: Collector, path: str, concepts: dict[str, dict], split: str, limit: int | None
) -> None:
    by_word: dict[str, list[str]] = {}
    for c, row in concepts.items():
        by_word.setdefault(row["word"].lower(), []).append(c)
    count: dict[str, int] = {}
    for n, row in _read_table(path, "sentences file", ("word", "sentence")):
        where = f"{path}:row {n}"
        word = str(row.get("word") or "").strip()
        text = row.get("sentence")
        concept = str(row.get("concept") or "").strip()
        targets = [concept] if concept else by_word.get(word.lower(), [])
        targets = [c for c in targets if c in concepts]
        if not targets:
            what = f"concept {concept!r}" if concept else f"word {word!r}"
            reason = f"row {n}: {what} names no loaded concept (see the words file and folders)"
            out.reject(f"row-{n}", TEXT, "validate", reason, where)
            continue
        for c in targets:
            k = count.get(c, 0)
            if limit is not None and k >= limit:
                continue
            count[c] = k + 1
            item_id = f"ctx-{c}-{k:04d}"
            cword = concepts[c]["word"]
            if not isinstance(text, str) or not text.strip():
                out.reject(item_id, TEXT, "validate", f"row {n}: empty sentence", where)
            elif not _contains(text, cword):
                reason = f"row {n}: the word {cword!r} does not occur in the sentence {text!r:.120}"
                out.reject(item_id, TEXT, "validate", reason, where)
            else:
                out.add(
                    item_id=item_id,
                    modality=TEXT,
                    role="context",
                    concept=c,
                    split=split,
                    text=text.strip(),
                    word=cword,
                    source=where,
                )
