"""The lake's Delta tables: where each one lives, its schema and its partition columns.

```
LAKE/items/       dataset=D/part-*.parquet                                   one row per item
LAKE/embeddings/  dataset=D/model=M/perturbation=P/layer=L/part-*.parquet   one row per
                  (item, layer, pooling)
LAKE/quarantine/  dataset=D/...        refused rows, with stage and reason
LAKE/trials/      dataset=D/...        forced-choice trials, for sources that have them
LAKE/concepts/    dataset=D/...        concepts with words and aliases, likewise
LAKE/manifest/    what each committed embeddings partition was computed from
LAKE/results/alignment/  study=S/...   one row per score
LAKE/results/study_log/  the latest outcome of each study per model pair (written, skipped,
                         failed, small_n), with the reason
```

Each is a Delta table: the Parquet files plus ``_delta_log/``, which alone says which files
are the table. Partition columns are not stored in the files (the Delta protocol keeps them in
the log and in the hive-style directory names). ``layer`` is a partition column, so that a
question about a few layers opens only their files.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from vlray.items import CONCEPTS_SCHEMA, ITEMS_SCHEMA, QUARANTINE_SCHEMA, TRIALS_SCHEMA
from vlray.results import ALIGNMENT_SCHEMA, STUDY_LOG_SCHEMA

EMBEDDINGS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("pooling", pa.string()),
        # A plain list (not fixed-size): widths differ between layers and models, and one
        # table schema must hold them all, for DuckDB, Polars and pyarrow alike.
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("dataset", pa.string()),
        pa.field("model", pa.string()),
        pa.field("perturbation", pa.string()),
        pa.field("layer", pa.int16()),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("model", pa.string()),
        ("perturbation", pa.string()),
        ("model_revision", pa.string()),
        ("config_hash", pa.string()),
        ("rows", pa.int64()),
        ("items", pa.int64()),
        ("layers", pa.int32()),
        ("layer_names", pa.list_(pa.string())),  # index = the `layer` partition value
        ("init", pa.string()),  # pretrained | random
        ("items_fingerprint", pa.string()),
        ("embeddings_version", pa.int64()),  # the embeddings table version that committed it
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("code_version", pa.string()),
        ("run_id", pa.string()),
    ]
)

# The items table carries its dataset's content hash in every row (one dictionary-encoded
# value per file), committed in the same transaction as the items it describes.
ITEMS_TABLE_SCHEMA = ITEMS_SCHEMA.append(pa.field("items_fingerprint", pa.string())).append(
    pa.field("dataset", pa.string())
)

# What each score was computed from: the study's inputs hash (refresh compares it) and the
# embeddings table version read.
RESULTS_TABLE_SCHEMA = ALIGNMENT_SCHEMA.append(pa.field("inputs_hash", pa.string())).append(
    pa.field("embeddings_version", pa.int64())
)


@dataclass(frozen=True)
class TableSpec:
    """A Delta table of the lake: ``path`` under the lake root, full ``schema`` (partition
    columns included) and ``partition_by``."""

    name: str
    path: str
    schema: pa.Schema
    partition_by: tuple[str, ...]

    @property
    def file_schema(self) -> pa.Schema:
        """The columns stored in the Parquet files (partition columns live in the log)."""
        return pa.schema([f for f in self.schema if f.name not in self.partition_by])


def _spec(name: str, path: str, schema: pa.Schema, *partition_by: str) -> TableSpec:
    return TableSpec(name, path, schema, partition_by)


TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in (
        _spec("items", "items", ITEMS_TABLE_SCHEMA, "dataset"),
        _spec(
            "embeddings",
            "embeddings",
            EMBEDDINGS_SCHEMA,
            "dataset",
            "model",
            "perturbation",
            "layer",
        ),
        _spec("quarantine", "quarantine", QUARANTINE_SCHEMA, "dataset"),
        _spec(
            "trials", "trials", TRIALS_SCHEMA.append(pa.field("dataset", pa.string())), "dataset"
        ),
        _spec(
            "concepts",
            "concepts",
            CONCEPTS_SCHEMA.append(pa.field("dataset", pa.string())),
            "dataset",
        ),
        _spec("manifest", "manifest", MANIFEST_SCHEMA),
        _spec("alignment", "results/alignment", RESULTS_TABLE_SCHEMA, "study"),
        _spec("study_log", "results/study_log", STUDY_LOG_SCHEMA),
    )
}
