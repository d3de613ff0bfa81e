"""Stage 3 of extraction, on write tasks: ``EmbeddingSink`` writes the embed stage's rows
as one Parquet file per (perturbation, layer) straight into the lake's embeddings table, and
hands back the files' add actions and the quarantine records; the driver commits them all
afterwards (``vlray.extract.job``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink

from vlray.lake import TABLES, Lake
from vlray.lake.delta import write_file

# Rows that leave the embed stage: embeddings, or a quarantine record (stage/reason set).
OUTPUT_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("perturbation", pa.string()),
        ("layer", pa.int16()),
        ("pooling", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),
    ]
)


def _layer_runs(table: pa.Table) -> list[tuple[str, int, pa.Table]]:
    """``(perturbation, layer, rows)`` for each run of one block. The embed stage emits a
    block's rows layer by layer, so a block with one perturbation needs no reordering; other
    blocks are put in (perturbation, layer) order with one stable sort on integer keys."""
    n = table.num_rows
    layers = table["layer"].to_numpy().astype(np.int64)
    names = pc.unique(table["perturbation"]).to_pylist()
    code = np.zeros(n, dtype=np.int64)
    for j, name in enumerate(names[1:], start=1):
        code[pc.equal(table["perturbation"], name).to_numpy(zero_copy_only=False)] = j
    key = code * 65536 + layers
    if n > 1 and (key[1:] < key[:-1]).any():
        order = np.argsort(key, kind="stable")
        table, key = table.take(pa.array(order)), key[order]
    bounds = [0, *(np.flatnonzero(key[1:] != key[:-1]) + 1).tolist(), n]
    return [
        (names[key[a] // 65536], int(key[a] % 65536), table.slice(a, b - a))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


class EmbeddingSink(Datasink):
    """Writes each (perturbation, layer) group of its blocks as one Parquet file straight
    into the lake's embeddings table, and returns the files' add actions: nothing is visible
    until ``extract_model`` commits them all in one transaction.

    Rows are grouped without sorting or copying the table: each block's runs of one layer are
    sliced out and the slices of a layer written together (readers order rows by item id).
    Quarantine records leave with the write results, not through files.
    """

    def __init__(
        self,
        lake: Lake,
        dataset: str,
        model: str,
        modality: str,
        run_id: str,
        rows_per_write: int = 200_000,
        count_poolings: tuple[str, ...] | None = None,
    ):
        self.lake = lake
        self.dataset = dataset
        self.model = model
        self.modality = modality
        self.run_id = run_id
        self.rows_per_write = rows_per_write
        # Items are counted as layer-0 rows of these poolings (each item has exactly one of
        # them), so that an item whose rows Ray Data split across write tasks counts once.
        # None: distinct ids per task (exact only if an item's rows stay in one task).
        self.count_poolings = count_poolings
        self.results: list[dict] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict:
        stem = f"{self.run_id}-{ctx.task_idx:05d}"
        groups: dict[tuple[str, int], list[pa.Table]] = defaultdict(list)
        errors: list[pa.Table] = []
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if table.num_rows == 0:
                continue
            is_error = pc.is_valid(table["stage"])
            if pc.any(is_error).as_py():
                errors.append(table.filter(is_error))
                table = table.filter(pc.invert(is_error))
            if table.num_rows:
                for pert, layer, rows in _layer_runs(table):
                    groups[(pert, layer)].append(rows)
        counts: dict[str, int] = defaultdict(int)
        items: dict[str, int] = defaultdict(int)
        adds = []
        for (pert, layer), parts in sorted(groups.items()):
            part = pa.concat_tables(parts)
            out = pa.table(
                {
                    "item_id": part["item_id"],
                    "modality": pa.array([self.modality] * part.num_rows, pa.string()),
                    "pooling": part["pooling"],
                    "embedding": part["embedding"],
                }
            )
            partition = {
                "dataset": self.dataset,
                "model": self.model,
                "perturbation": pert,
                "layer": layer,
            }
            # Float embeddings barely compress (a few per cent); writing them plain keeps the
            # writers ahead of a GPU. Ids and names are dictionary-encoded either way.
            adds.append(
                write_file(self.lake.storage, TABLES["embeddings"], out, partition, stem, "none")
            )
            counts[pert] += out.num_rows
            if layer == 0 and self.count_poolings:
                wanted = pc.is_in(part["pooling"], pa.array(self.count_poolings, pa.string()))
                items[pert] += int(pc.sum(wanted).as_py() or 0)
            elif layer == 0:
                items[pert] += len(pc.unique(part["item_id"]))
        quarantined = (
            pa.concat_tables(errors).select(
                ["item_id", "perturbation", "stage", "reason", "source"]
            )
            if errors
            else None
        )
        return {
            "rows": dict(counts),
            "items": dict(items),
            "adds": adds,
            "quarantine": quarantined,
        }

    def on_write_complete(self, write_result) -> None:
        self.results = list(write_result.write_returns)
