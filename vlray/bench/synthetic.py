"""A synthetic lake with planted alignment: known answers for alignment at any scale.

``write_planted_lake`` writes a captioned dataset and two "models" (``planted_vision`` and
``planted_language``) whose embeddings are structured random numbers, through the lake's
normal commit path (``Lake.write_items``, ``delta.write_file``, ``Lake.commit_embeddings``),
so that the rows, partitions and manifest records are those of a real extraction: item ids,
``pair_id``, roles, perturbation ``none``, ``mean`` pooling, a layer per partition, layer
names and config hashes. No model runs, so a lake of 20,000 images with 1,024-wide layers
takes seconds of CPU, and the alignment benchmark and the tests of sharded alignment can
check their scores against a planted truth.

Planting: every image has a latent ``z`` (``RANK`` numbers, shared by both models). Vision
layer ``i`` embeds image ``k`` as ``s_v(i) * z_k @ A_i + noise``; language layer ``j`` embeds
each caption of image ``k`` as ``s_t(j) * z_k @ B_j + noise``, with noise drawn for each
caption. ``A_i`` and ``B_j`` are random maps with orthonormal rows, scaled so that the signal
has unit variance per dimension, like the noise: a layer's signal-to-noise ratio is its
strength squared, whatever its width. The strengths are bumps over depth, highest at ``peak``
(``STRENGTH_HIGH``) and falling to ``STRENGTH_LOW`` within a few layers, so that every
alignment metric that grows with shared signal (cka, mutual_knn, unbiased_cka, rsa) is
highest at exactly ``peak`` and clearly lower two layers away.

Everything is a function of ``seed``: the latents, and each layer's map and noise (each drawn
from its own stream, so a layer does not depend on the order it is written in). Layers are
generated and written one at a time: memory holds one layer of one model, never a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from vlray.catalog import ModelSpec
from vlray.errors import UsageError
from vlray.extract import config_hash
from vlray.items import (
    EXTRA_TABLES,
    IMAGE,
    NO_PERTURBATION,
    TEXT,
    items_table,
    quarantine_table,
)
from vlray.lake import TABLES, ItemsFingerprint, Lake, new_run_id
from vlray.lake.delta import write_file

__all__ = ["PlantedLake", "planted_specs", "strengths", "write_planted_lake"]

RANK = 16  # dimensions of the shared latent (fewer when a layer is narrower)
STRENGTH_HIGH = 1.0  # signal scale at the peak layer: signal and noise of equal variance
STRENGTH_LOW = 0.2  # far from the peak: a little shared signal, as between real models
BUMP_WIDTH = 1.0  # in layers: the strength two layers from the peak is 0.31, one away 0.69
# The planting recipe's version, in the specs' revision: a changed recipe changes every
# config hash, so `refresh` and `only_changed` see the old embeddings as stale.
RECIPE = "planted-1"
# Items per file of a layer, as extraction's write tasks do (ExtractOptions.items_per_write):
# a partition of several files, which sharded readers can split.
ITEMS_PER_FILE = 1024
# Rows of signal added at a time, so that the signal never needs a second full layer.
BLOCK = 4096


@dataclass(frozen=True)
class PlantedLake:
    """What ``write_planted_lake`` wrote: where, the two model specs to align, and the truth."""

    uri: str
    dataset: str
    vision: ModelSpec
    language: ModelSpec
    n: int  # images, each with `captions` captions
    layers: tuple[int, int]  # (vision layers, language layers)
    widths: tuple[int, int]
    peak: tuple[int, int]  # the (vision layer, language layer) of highest alignment
    captions: int = 1
    seed: int = 0

    def embeddings_bytes(self) -> int:
        """The float32 payload of both models' embeddings: ``n`` rows per vision layer and
        ``n * captions`` per language layer, times the layer's width, 4 bytes each."""
        vision = self.n * self.layers[0] * self.widths[0]
        language = self.n * self.captions * self.layers[1] * self.widths[1]
        return 4 * (vision + language)


def strengths(layers: int, peak: int) -> np.ndarray:
    """Signal scale of each layer: a bump over depth, ``STRENGTH_HIGH`` at ``peak`` only."""
    depth = np.arange(layers, dtype=np.float64)
    bump = np.exp(-0.5 * ((depth - peak) / BUMP_WIDTH) ** 2)
    return STRENGTH_LOW + (STRENGTH_HIGH - STRENGTH_LOW) * bump


def planted_specs(
    layers: tuple[int, int], widths: tuple[int, int], peak: tuple[int, int], seed: int = 0
) -> tuple[ModelSpec, ModelSpec]:
    """The two models' catalog specs. Every planting parameter is in the spec (``kwargs``,
    ``seed``, ``revision``), so the spec's fingerprint, and so the config hash the manifest
    records, changes whenever the embeddings would."""
    rank = _rank(widths)

    def spec(side: int, modality: Literal["vision", "language"]) -> ModelSpec:
        planting = {"layers": layers[side], "width": widths[side], "peak": peak[side]}
        return ModelSpec(
            name=f"planted_{modality}",
            modality=modality,
            source="packaged",
            id="synthetic",
            revision=RECIPE,
            kwargs={"planted": {**planting, "rank": rank}},
            seed=seed,
        )

    return spec(0, "vision"), spec(1, "language")


def write_planted_lake(
    uri: str,
    *,
    n: int = 500,
    layers: tuple[int, int] = (13, 13),
    widths: tuple[int, int] = (256, 256),
    peak: tuple[int, int] | None = None,
    captions: int = 1,
    dataset: str = "planted",
    seed: int = 0,
) -> PlantedLake:
    """Write a dataset of ``n`` images with ``captions`` captions each and both planted
    models' embeddings of it into the lake at ``uri`` (a local path or an object store URI).

    ``peak`` defaults to about two thirds of each model's depth. Writing again replaces the
    dataset's items (only if they changed) and both models' partitions, with identical values
    for identical arguments. Raises ``ValueError`` for impossible sizes, ``LakeError`` when
    the lake cannot be written.
    """
    layers, widths = _pair(layers, "layers"), _pair(widths, "widths")
    if peak is None:
        peak = (round(2 * (layers[0] - 1) / 3), round(2 * (layers[1] - 1) / 3))
    peak = _pair(peak, "peak", minimum=0)
    if n < 3:
        raise UsageError(f"n must be at least 3 images (alignment needs 3 pairs), got {n}")
    if captions < 1:
        raise UsageError(f"captions must be at least 1, got {captions}")
    for side in (0, 1):
        if peak[side] >= layers[side]:
            raise UsageError(f"peak {peak} lies outside the layers {layers}")
    vision, language = planted_specs(layers, widths, peak, seed)
    planted = PlantedLake(
        uri, dataset, vision, language, n, layers, widths, peak, captions=captions, seed=seed
    )

    lake = Lake(uri)
    lake.check(write=True)
    run_id = new_run_id()
    fingerprints = _write_items(lake, dataset, n, captions, run_id)
    latent = _latent(n, _rank(widths), seed)
    for side, spec in enumerate((vision, language)):
        _write_model(lake, planted, side, spec, latent, fingerprints, run_id)
    return planted


# --- items -----------------------------------------------------------------------------------


def _image_ids(n: int) -> list[str]:
    # Zero-padded, so that the lake's order (rows sorted by item id) is the latent's order.
    digits = max(6, len(str(n - 1)))
    return [f"img{k:0{digits}d}" for k in range(n)]


def _caption_id(image: str, k: int) -> str:
    # COCO's convention (vlray.sources.coco): an image's captions are IMAGE_ID#cK.
    return f"{image}#c{k}"


def _write_items(lake: Lake, dataset: str, n: int, captions: int, run_id: str) -> ItemsFingerprint:
    """The dataset's items, as a captions source gives them: images (role ``scene``, their
    own ``pair_id``) and their captions (role ``caption``, the image's ``pair_id``). Images
    carry neither bytes nor a path: no model will read them."""
    source = "vlray.bench.synthetic"
    rows = []
    for k, image in enumerate(_image_ids(n)):
        common = {"pair_id": image, "split": "train", "source": source}
        rows.append({"item_id": image, "modality": IMAGE, "role": "scene", **common})
        rows += [
            {
                "item_id": _caption_id(image, c),
                "modality": TEXT,
                "role": "caption",
                "text": f"planted caption {c} of image {k}",
                **common,
            }
            for c in range(captions)
        ]
    fingerprints = lake.write_items(dataset, items_table(rows), quarantine_table([]), run_id)
    # As the extraction job does: a dataset name reused from another source keeps no stale
    # trials or concepts.
    for name in EXTRA_TABLES:
        lake.remove_table_for(dataset, name)
    return fingerprints


# --- embeddings ------------------------------------------------------------------------------


def _rank(widths: tuple[int, int]) -> int:
    # A layer narrower than the latent could not carry all of it (its map would not have
    # orthonormal rows), so the latent is no wider than the narrowest layer.
    return min(RANK, *widths)


def _latent(n: int, rank: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).standard_normal((n, rank), dtype=np.float32)


def _layer_names(modality: str, layers: int) -> list[str]:
    # The names real models' taps get: timm's blocks, and Hugging Face's hidden states
    # (vlray.models: the embeddings, then layer.0, layer.1, ...).
    if modality == "vision":
        return [f"blocks.{i}" for i in range(layers)]
    return ["embeddings"] + [f"layer.{i}" for i in range(layers - 1)]


def _planted_layer(
    latent: np.ndarray, strength: float, width: int, copies: int, rng: np.random.Generator
) -> np.ndarray:
    """One layer, ``(n * copies, width)`` float32: ``copies`` rows per image (its captions),
    each ``strength * z @ M`` plus its own unit noise."""
    n, rank = latent.shape
    # Orthonormal rows scaled by sqrt(width / rank): the signal's variance is strength**2 per
    # dimension on average, and every latent direction is carried equally, so layers differ
    # in their strength alone, not in a random map's stretch.
    basis, _ = np.linalg.qr(rng.standard_normal((width, rank)))
    mapping = (basis.T * np.sqrt(width / rank) * strength).astype(np.float32)
    out = rng.standard_normal((n * copies, width), dtype=np.float32)
    view = out.reshape(n, copies, width)
    for start in range(0, n, BLOCK):  # in blocks: no second layer-sized array
        view[start : start + BLOCK] += (latent[start : start + BLOCK] @ mapping)[:, None, :]
    return out


def _embedding_table(ids: pa.Array, modality: str, pooling: str, vectors: np.ndarray) -> pa.Table:
    rows, width = vectors.shape
    # The list column wraps the array's buffer (no copy), as extraction builds it.
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    return pa.table(
        {
            "item_id": ids,
            "modality": pa.repeat(pa.scalar(modality, pa.string()), rows),
            "pooling": pa.repeat(pa.scalar(pooling, pa.string()), rows),
            "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1))),
        }
    )


def _write_model(
    lake: Lake,
    planted: PlantedLake,
    side: int,
    spec: ModelSpec,
    latent: np.ndarray,
    fingerprints: ItemsFingerprint,
    run_id: str,
) -> None:
    """Write one model's layers, one at a time, then commit them as extraction does: its
    (empty) quarantine, one transaction for the partition, and the manifest record."""
    modality = IMAGE if spec.modality == "vision" else TEXT
    copies = 1 if modality == IMAGE else planted.captions
    item_ids = _image_ids(planted.n)
    if modality == TEXT:  # an image's captions follow each other, as its latent's copies do
        item_ids = [_caption_id(image, c) for image in item_ids for c in range(copies)]
    ids = pa.array(item_ids, pa.string())
    pooling = spec.pooling[0]
    n_layers, width = planted.layers[side], planted.widths[side]
    scale = strengths(n_layers, planted.peak[side])
    rows_per_file = ITEMS_PER_FILE * copies
    adds = []
    for layer in range(n_layers):
        # A stream of its own per (seed, model, layer): layers are independent of each other
        # and of the order they are written in.
        rng = np.random.default_rng([planted.seed, 1 + side, layer])
        vectors = _planted_layer(latent, float(scale[layer]), width, copies, rng)
        partition = {
            "dataset": planted.dataset,
            "model": spec.name,
            "perturbation": NO_PERTURBATION,
            "layer": layer,
        }
        # A file per ITEMS_PER_FILE images (an image's captions stay in one file), each built
        # on its slice of the layer (a view, no copy), with offsets that stay small.
        for part, start in enumerate(range(0, len(item_ids), rows_per_file)):
            rows = slice(start, start + rows_per_file)
            table = _embedding_table(ids[rows], modality, pooling, vectors[rows])
            # Uncompressed, like extraction's files: random floats do not compress.
            adds.append(
                write_file(
                    lake.storage,
                    TABLES["embeddings"],
                    table,
                    partition,
                    f"{run_id}-{part:05d}",
                    "none",
                )
            )
        del vectors, table  # the layer's memory goes before the next layer is drawn
    lake.merge_quarantine(
        planted.dataset, spec.name, quarantine_table([]), [NO_PERTURBATION], run_id
    )
    items_fingerprint = fingerprints.partitions[(modality, NO_PERTURBATION)]
    lake.commit_embeddings(
        planted.dataset,
        spec.name,
        adds,
        [
            {
                "dataset": planted.dataset,
                "model": spec.name,
                "perturbation": NO_PERTURBATION,
                "model_revision": f"{spec.id}=={spec.revision}",
                "config_hash": config_hash(spec, items_fingerprint),
                "rows": len(ids) * n_layers,
                "items": len(ids),
                "layers": n_layers,
                "layer_names": _layer_names(spec.modality, n_layers),
                "init": spec.init,
                "items_fingerprint": items_fingerprint,
            }
        ],
        run_id,
    )


def _pair(value: tuple[int, int], name: str, minimum: int = 1) -> tuple[int, int]:
    pair = [int(v) for v in value]
    if len(pair) != 2 or min(pair) < minimum:
        raise UsageError(f"{name} must be two integers of at least {minimum}, got {value}")
    return pair[0], pair[1]
