"""The items table: one row per image or text that a model will embed.

Every source (the shapes world, a user manifest, COCO captions, Pick-a-Pic, image folders,
Parquet and WebDataset exports) produces a pyarrow Table with ``ITEMS_SCHEMA``. The key of a
row is ``(item_id, modality, perturbation)``: a perturbed image keeps the item id of its
original and names the change in ``perturbation``, so an original and its perturbed copy join
on ``item_id``. Some sources also return extra tables (``EXTRA_TABLES``): forced-choice trials
and concepts with their aliases.

Images and texts that describe the same scene share a ``pair_id``: alignment pairs row i of a
vision model's embeddings with row i of a language model's through it.
"""

from __future__ import annotations

import datetime as _dt

import pyarrow as pa

IMAGE = "image"
TEXT = "text"
MODALITIES = (IMAGE, TEXT)

NO_PERTURBATION = "none"
PERTURBATION_FAMILIES = ("image_appearance", "image_semantic", "text_appearance", "text_semantic")


def perturbation_family(name: str) -> str:
    """The family of a perturbation: a perturbation is named ``FAMILY/NAME``
    (``image_semantic/replace``)."""
    return name.split("/", 1)[0]


# Roles, in the field's words: a multi-object scene, a single-object concept exemplar, a
# caption of an image, an in-context sentence that uses a concept word (embedded with
# word-span pooling), and a foil: a near miss made for forced-choice trials (an image or a
# caption); not part of layerwise pairs.
ROLES = ("scene", "exemplar", "caption", "context", "foil")

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("pair_id", pa.string()),
        pa.field("role", pa.string()),
        pa.field("concept", pa.string()),
        pa.field("split", pa.string()),
        pa.field("text", pa.string()),
        # The target word (or multi-word span) inside `text` whose sub-word tokens are pooled.
        pa.field("word", pa.string()),
        # Encoded image bytes (PNG/JPEG/...), or a path/URI to read them from; one of the two.
        pa.field("image", pa.binary()),
        pa.field("image_path", pa.string()),
        pa.field("perturbation", pa.string(), nullable=False),
        pa.field("scene_graph", pa.string()),  # JSON
        pa.field("source", pa.string()),  # where the row came from (file, column, generator)
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("modality", pa.string()),  # null for a refused row that is no item (a trial)
        pa.field("perturbation", pa.string()),
        pa.field("stage", pa.string()),  # read | decode | validate | embed
        pa.field("reason", pa.string()),
        pa.field("source", pa.string()),
        # Null for problems of the item itself; the model name where only that model failed it.
        pa.field("model", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

QUARANTINE_STAGES = ("read", "decode", "validate", "embed")
# Quarantine reasons a person is shown per dataset (extract's summary, the report); the rest
# are one query away.
TOP_QUARANTINE_REASONS = 5

# Forced choice runs both ways (He, Trott & Khosla 2025): a caption and the images to choose
# between ("text_to_image"), or an image and the captions to choose between ("image_to_text").
TRIAL_DIRECTIONS = ("text_to_image", "image_to_text")
# What a trial's foil changes (the shapes world): "lexical" one object's shape or colour, so the
# two captions differ in one word; "binding" the colours of two objects swapped between them,
# and "relation" two objects' places exchanged, so the two captions hold the same words and
# only their order tells them apart (a bag of words cannot pass these).
TRIAL_KINDS = ("lexical", "binding", "relation")


def trial_kind_order(kind: str | None) -> tuple:
    """A sort key: ``TRIAL_KINDS`` in their order, other kinds by name, trials without a kind
    last."""
    if kind in TRIAL_KINDS:
        return (0, TRIAL_KINDS.index(kind), "")
    return (1, 0, kind) if kind is not None else (2, 0, "")


# Forced-choice trials (Pick-a-Pic, the shapes world's foils): the query item, the candidates,
# and which one is right. ``query_item_id`` is the caption (text_to_image) or the image
# (image_to_text); ``choice_item_ids`` the candidates, of the other modality; ``preferred``
# indexes ``choice_item_ids`` and is null for a tie; ``label`` holds the raw per-choice labels
# (Pick-a-Pic: 1/0, or 0.5/0.5 for a tie).
TRIALS_SCHEMA = pa.schema(
    [
        pa.field("trial_id", pa.string(), nullable=False),
        pa.field("direction", pa.string()),  # one of TRIAL_DIRECTIONS
        # One of TRIAL_KINDS; null for trials of a source that does not say.
        pa.field("kind", pa.string()),
        pa.field("query_item_id", pa.string()),
        pa.field("choice_item_ids", pa.list_(pa.string())),
        pa.field("preferred", pa.int8()),
        pa.field("label", pa.list_(pa.float32())),
        pa.field("split", pa.string()),
        pa.field("source", pa.string()),
    ]
)

# Concepts of a concept-level dataset (image folders): the word that names each concept and
# every alias a retrieval hit may match (the word first), with optional word statistics for
# the frequency and polysemy breakdowns.
CONCEPTS_SCHEMA = pa.schema(
    [
        pa.field("concept", pa.string(), nullable=False),
        pa.field("word", pa.string()),
        pa.field("aliases", pa.list_(pa.string())),
        pa.field("frequency", pa.float64()),
        pa.field("polysemy", pa.int32()),
        pa.field("source", pa.string()),
    ]
)

# Tables a source may return besides its items and quarantine, by name; each is stored in the
# lake at ``LAKE/NAME/dataset=D/part-0.parquet`` and read through the DuckDB view ``NAME``.
EXTRA_TABLES: dict[str, pa.Schema] = {"trials": TRIALS_SCHEMA, "concepts": CONCEPTS_SCHEMA}


def fit_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` as ``schema``: its columns selected and cast, and a nullable column it lacks
    (one a later vlray added, such as a trial's ``kind``) null. A required column it lacks
    raises ``KeyError``; a value that does not cast, ``pyarrow.ArrowInvalid``."""
    for f in schema:
        if f.name not in table.column_names and f.nullable:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


def items_table(rows: list[dict]) -> pa.Table:
    """Build an items table from row dicts; missing optional fields become null."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in ITEMS_SCHEMA}
    cols["perturbation"] = [p or NO_PERTURBATION for p in cols["perturbation"]]
    return pa.Table.from_pydict(cols, schema=ITEMS_SCHEMA)


def quarantine_row(
    *,
    dataset: str,
    item_id: str | None,
    modality: str | None,
    stage: str,
    reason: str,
    source: str | None = None,
    perturbation: str | None = NO_PERTURBATION,
    model: str | None = None,
) -> dict:
    """One quarantine record. ``reason`` is a single line a person understands."""
    if stage not in QUARANTINE_STAGES:
        raise ValueError(f"quarantine stage must be one of {QUARANTINE_STAGES}, got {stage!r}")
    return {
        "dataset": dataset,
        "item_id": item_id,
        "modality": modality,
        "perturbation": perturbation,
        "stage": stage,
        "reason": " ".join(str(reason).split()),
        "source": source,
        "model": model,
        "created_at": _dt.datetime.now(_dt.UTC),
    }


def quarantine_table(rows: list[dict]) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in QUARANTINE_SCHEMA}
    return pa.Table.from_pydict(cols, schema=QUARANTINE_SCHEMA)


def trials_table(rows: list[dict]) -> pa.Table:
    """Build a trials table (``TRIALS_SCHEMA``) from row dicts; missing fields become null.

    A row is one trial in one direction (``TRIAL_DIRECTIONS``): ``query_item_id`` and the
    ``choice_item_ids`` to pick from, ``preferred`` the index of the right choice (null: a tie).
    """
    return pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA)


def concepts_table(rows: list[dict]) -> pa.Table:
    """Build a concepts table (``CONCEPTS_SCHEMA``) from row dicts; missing fields become null."""
    return pa.Table.from_pylist(rows, schema=CONCEPTS_SCHEMA)
