"""Reading embeddings back out of the lake as per-layer arrays, paired across modalities.

Only the partitions and layers a question needs are opened: ``dataset``, ``model``,
``perturbation`` and ``layer`` are partition columns of the embeddings table, so a filter on
them selects files from the Delta log before any file is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlray.errors import VlrayError
from vlray.items import NO_PERTURBATION
from vlray.lake import Lake


class EmbeddingsNotFound(VlrayError, LookupError):
    """The lake lacks a partition or layer a question needs; the message names it."""


@dataclass(frozen=True)
class LayerStack:
    """One model's embeddings of some items: ``layers[l]`` is ``(len(item_ids), dim_l)``."""

    model: str
    item_ids: np.ndarray
    layers: list[np.ndarray]
    layer_names: list[str]
    pooling: str


def _as_matrix(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    n = len(arr)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(n, len(values) // n if n else 0)


def _partition(dataset: str, model: str, perturbation: str, pooling: str) -> pc.Expression:
    return (
        (pc.field("dataset") == dataset)
        & (pc.field("model") == model)
        & (pc.field("perturbation") == perturbation)
        & (pc.field("pooling") == pooling)
    )


def _record(lake: Lake, dataset: str, model: str, perturbation: str) -> dict:
    record = lake.partitions(dataset, model).get(perturbation)
    if record is None or not record["rows"]:
        raise EmbeddingsNotFound(
            f"no embeddings for dataset '{dataset}', model '{model}', perturbation "
            f"'{perturbation}' in {lake.uri} (run `vlray extract` for it first)"
        )
    return record


def embedded_ids(
    lake: Lake, dataset: str, model: str, pooling: str, perturbation: str = NO_PERTURBATION
) -> np.ndarray:
    """The ids of the items a model embedded (its first layer's rows), sorted, read without
    the embeddings."""
    _record(lake, dataset, model, perturbation)
    table = lake.dataset("embeddings").to_table(
        columns=["item_id"],
        filter=_partition(dataset, model, perturbation, pooling) & (pc.field("layer") == 0),
    )
    return np.sort(table["item_id"].to_numpy(zero_copy_only=False))


def load_layers(
    lake: Lake,
    dataset: str,
    model: str,
    pooling: str,
    perturbation: str = NO_PERTURBATION,
    layers: list[int] | None = None,
) -> LayerStack:
    """Every (or the listed) layer of a model for one pooling, rows sorted by item id."""
    record = _record(lake, dataset, model, perturbation)
    present = list(range(record["layers"]))
    wanted = present if layers is None else layers
    missing = [layer for layer in wanted if layer not in present]
    if missing:
        raise EmbeddingsNotFound(
            f"model '{model}' has no layer(s) {missing} in dataset '{dataset}' "
            f"(layers present: {present})"
        )
    source = lake.dataset("embeddings")
    partition = _partition(dataset, model, perturbation, pooling)
    ids = None
    mats = []
    for layer in wanted:
        table = source.to_table(
            columns=["item_id", "embedding"],
            filter=partition & (pc.field("layer") == layer),
        ).sort_by("item_id")
        if table.num_rows == 0:
            raise EmbeddingsNotFound(
                f"model '{model}' layer {layer}: no rows with pooling '{pooling}' in dataset "
                f"'{dataset}'"
            )
        layer_ids = table["item_id"].to_numpy(zero_copy_only=False)
        if ids is None:
            ids = layer_ids
        elif not np.array_equal(ids, layer_ids):
            raise EmbeddingsNotFound(f"model '{model}': layer {layer} holds other items than 0")
        mats.append(_as_matrix(table["embedding"]))
    return LayerStack(model, ids, mats, list(record["layer_names"] or []), pooling)


def take_rows(stack: LayerStack, ids: np.ndarray) -> LayerStack:
    """The rows of ``ids``, in that order (every id must be present)."""
    index = {item: i for i, item in enumerate(stack.item_ids)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise EmbeddingsNotFound(
            f"model '{stack.model}': {len(missing)} item(s) without embeddings, e.g. {missing[0]}"
        )
    rows = np.array([index[i] for i in ids], dtype=np.int64)
    return LayerStack(
        stack.model,
        np.asarray(ids),
        [m[rows] for m in stack.layers],
        stack.layer_names,
        stack.pooling,
    )


def mean_by_group(stack: LayerStack, groups: np.ndarray, order: np.ndarray) -> LayerStack:
    """Average rows that share a group key (e.g. an image's captions), one row per key in
    ``order``."""
    keys, inverse = np.unique(groups, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(keys)).astype(np.float64)
    position = {k: i for i, k in enumerate(keys)}
    rows = np.array([position[k] for k in order], dtype=np.int64)
    layers = []
    for m in stack.layers:
        sums = np.zeros((len(keys), m.shape[1]), dtype=np.float64)
        np.add.at(sums, inverse, m)
        layers.append((sums / counts[:, None])[rows].astype(np.float32))
    return LayerStack(stack.model, np.asarray(order), layers, stack.layer_names, stack.pooling)


def layer_widths(
    lake: Lake, dataset: str, model: str, pooling: str, perturbation: str, layers: int
) -> tuple[int, ...]:
    """Each layer's width, from one row of each layer's partition."""
    source = lake.dataset("embeddings")
    partition = _partition(dataset, model, perturbation, pooling)
    widths = []
    for layer in range(layers):
        row = source.head(1, columns=["embedding"], filter=partition & (pc.field("layer") == layer))
        if row.num_rows == 0:
            raise EmbeddingsNotFound(
                f"model '{model}' layer {layer}: no rows in dataset '{dataset}'"
            )
        widths.append(len(row["embedding"][0]))
    return tuple(widths)


@dataclass(frozen=True)
class LakeLayers:
    """One model's layers as the rows of a pairing, read from the lake a few layers at a time.

    What a task that must not hold a whole stack is given: ``load(layers)`` reads those layers'
    partitions only, takes the rows of ``item_ids`` in order and, with ``groups``, averages the
    rows sharing a group key into one row per key of ``order`` (an image's captions).
    """

    lake: Lake
    dataset: str
    model: str
    pooling: str
    perturbation: str
    item_ids: np.ndarray
    labels: tuple[str, ...]
    widths: tuple[int, ...]
    groups: np.ndarray | None = None
    order: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.item_ids if self.order is None else self.order)

    def load(self, layers: Sequence[int]) -> list[np.ndarray]:
        stack = load_layers(
            self.lake, self.dataset, self.model, self.pooling, self.perturbation, list(layers)
        )
        stack = take_rows(stack, self.item_ids)
        if self.groups is not None:
            stack = mean_by_group(stack, self.groups, self.order)
        return stack.layers
