"""Reading embeddings back out of the lake as per-layer arrays, paired across modalities.

Only the partitions and layer files a question needs are opened: a (dataset, model,
perturbation) partition is a directory, and each file in it holds one layer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlray.items import NO_PERTURBATION
from vlray.lake import Lake

_LAYER_FILE = re.compile(r"part-L(\d+)-")


class EmbeddingsNotFound(LookupError):
    """The lake lacks a partition or layer a question needs; the message names it."""


@dataclass(frozen=True)
class LayerStack:
    """One model's embeddings of some items: ``layers[l]`` is ``(len(item_ids), dim_l)``."""

    model: str
    item_ids: np.ndarray
    layers: list[np.ndarray]
    layer_names: list[str]
    pooling: str


def layer_files(lake: Lake, dataset: str, model: str, perturbation: str) -> dict[int, list[str]]:
    """layer -> the partition's files for it."""
    part = lake.partition_dir(dataset, model, perturbation)
    files = lake.list_files(part)
    if not files:
        raise EmbeddingsNotFound(
            f"no embeddings for dataset '{dataset}', model '{model}', perturbation "
            f"'{perturbation}' in {lake.uri} (run `vlray extract` for it first)"
        )
    by_layer: dict[int, list[str]] = {}
    for f in files:
        match = _LAYER_FILE.search(f.rsplit("/", 1)[-1])
        if match:
            by_layer.setdefault(int(match.group(1)), []).append(f)
    return by_layer


def _as_matrix(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    width = arr.type.list_size
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), width)


def load_layers(
    lake: Lake,
    dataset: str,
    model: str,
    pooling: str,
    perturbation: str = NO_PERTURBATION,
    layers: list[int] | None = None,
) -> LayerStack:
    """Every (or the listed) layer of a model for one pooling, rows sorted by item id."""
    by_layer = layer_files(lake, dataset, model, perturbation)
    wanted = sorted(by_layer) if layers is None else layers
    missing = [layer for layer in wanted if layer not in by_layer]
    if missing:
        raise EmbeddingsNotFound(
            f"model '{model}' has no layer(s) {missing} in dataset '{dataset}' "
            f"(layers present: {sorted(by_layer)})"
        )
    ids = None
    mats = []
    for layer in wanted:
        table = pa.concat_tables(
            pq.read_table(f, filesystem=lake.fs, columns=["item_id", "pooling", "embedding"])
            for f in by_layer[layer]
        )
        table = table.filter(pc.field("pooling") == pooling).sort_by("item_id")
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
    return LayerStack(model, ids, mats, _layer_names(lake, dataset, model, perturbation), pooling)


def _layer_names(lake: Lake, dataset: str, model: str, perturbation: str) -> list[str]:
    record = lake.partitions(dataset, model).get(perturbation)
    return json.loads(record["layer_names"]) if record else []


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
