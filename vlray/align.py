"""The alignment job: lake embeddings -> layer-grid scores -> the ``alignment`` results table.

One Ray task per (vision model, language model, dataset) reads only the two models' unperturbed
partitions, pairs each image with its captions through ``pair_id``, scores every (vision layer,
language layer) pair with ``vlray.metrics.grid_stats`` and commits its own results file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc
import ray

from vlray.catalog import ModelSpec
from vlray.cluster import ensure_ray
from vlray.embeddings import LayerStack, load_layers, mean_by_group, take_rows
from vlray.items import IMAGE, NO_PERTURBATION, TEXT
from vlray.lake import Lake, new_run_id
from vlray.results import alignment_table, grid_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignOptions:
    metrics: tuple[str, ...] = ("mutual_knn", "cka", "unbiased_cka", "rsa")
    metric_kwargs: dict | None = None  # metric -> kwargs, e.g. {"mutual_knn": {"k": 10}}
    bootstrap: int = 100
    permutations: int = 100
    confidence: float = 0.95
    seed: int = 0
    captions: str = "mean"  # an image's text side: the mean of its captions, or the first
    image_roles: tuple[str, ...] = ("scene", "exemplar")
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None  # None: a quarter GPU when the cluster has GPUs


def paired_layers(
    lake: Lake, dataset: str, vision: ModelSpec, language: ModelSpec, options: AlignOptions
) -> tuple[LayerStack, LayerStack]:
    """Row i of the vision stack and row i of the language stack describe the same image."""
    items = lake.read_items(
        dataset, columns=["item_id", "modality", "pair_id", "role", "perturbation"]
    )
    items = items.filter(pc.field("perturbation") == NO_PERTURBATION)
    images = items.filter(
        (pc.field("modality") == IMAGE) & pc.field("role").isin(list(options.image_roles))
    )
    captions = items.filter((pc.field("modality") == TEXT) & (pc.field("role") == "caption"))

    v = load_layers(lake, dataset, vision.name, vision.pooling[0])
    t = load_layers(lake, dataset, language.name, language.pooling[0])
    # Only items both models embedded (quarantined rows are simply absent), images with a caption.
    embedded_captions = captions.filter(pc.field("item_id").isin(t.item_ids))
    if options.captions == "first":
        embedded_captions = embedded_captions.sort_by("item_id")
        first = {}
        for item_id, pair_id in zip(
            embedded_captions["item_id"].to_pylist(),
            embedded_captions["pair_id"].to_pylist(),
            strict=True,
        ):
            first.setdefault(pair_id, item_id)
        embedded_captions = embedded_captions.filter(pc.field("item_id").isin(list(first.values())))
    described = set(embedded_captions["pair_id"].to_pylist())
    images = images.filter(pc.field("item_id").isin(v.item_ids))
    image_rows = sorted(
        (p, i)
        for p, i in zip(images["pair_id"].to_pylist(), images["item_id"].to_pylist(), strict=True)
        if p in described
    )
    if len(image_rows) < 3:
        raise ValueError(
            f"dataset '{dataset}': only {len(image_rows)} image(s) with captions "
            f"embedded by both '{vision.name}' and '{language.name}'"
        )
    pair_ids = np.array([p for p, _ in image_rows], dtype=object)
    v = take_rows(v, np.array([i for _, i in image_rows], dtype=object))
    t = take_rows(t, np.asarray(embedded_captions["item_id"].to_numpy(zero_copy_only=False)))
    t = mean_by_group(t, embedded_captions["pair_id"].to_numpy(zero_copy_only=False), pair_ids)
    return v, t


def _layer_labels(stack: LayerStack) -> list[str]:
    names = stack.layer_names or [str(i) for i in range(len(stack.layers))]
    return [f"{stack.model} layer {i} ({n})" for i, n in enumerate(names)]


def align_pair(
    lake_uri: str, dataset: str, vision: dict, language: dict, options: AlignOptions, run_id: str
) -> dict:
    """Score one (vision, language, dataset) and commit its results file; returns a summary."""
    import torch

    from vlray import metrics

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(options.cpus_per_task)))
    started = time.time()
    lake = Lake(lake_uri)
    v_spec, l_spec = ModelSpec(**vision), ModelSpec(**language)
    v, t = paired_layers(lake, dataset, v_spec, l_spec, options)
    rows = []
    for metric in options.metrics:
        kwargs = (options.metric_kwargs or {}).get(metric, {})
        stats = metrics.grid_stats(
            v.layers,
            t.layers,
            metric,
            n_bootstrap=options.bootstrap,
            n_permutations=options.permutations,
            confidence=options.confidence,
            seed=options.seed,
            labels_x=_layer_labels(v),
            labels_y=_layer_labels(t),
            **kwargs,
        )
        rows += grid_rows(
            stats,
            study="layerwise",
            dataset=dataset,
            vision_model=v_spec.name,
            language_model=l_spec.name,
            metric=metric,
            condition="none",
            run_id=run_id,
        )
    lake.write_results(
        "layerwise",
        results_name(dataset, v_spec.name, l_spec.name),
        alignment_table(rows),
        run_id,
        inputs_hash(lake, dataset, v_spec.name, l_spec.name, options),
    )
    return {
        "dataset": dataset,
        "vision_model": v_spec.name,
        "language_model": l_spec.name,
        "rows": len(rows),
        "n": len(v.item_ids),
        "seconds": time.time() - started,
    }


_RESOURCE_FIELDS = ("cpus_per_task", "gpus_per_task")


def results_name(dataset: str, vision: str, language: str) -> str:
    return f"{dataset}--{vision}--{language}"


def inputs_hash(lake: Lake, dataset: str, vision: str, language: str, options: AlignOptions) -> str:
    """What a pair's scores depend on: both models' committed unperturbed partitions (their
    config hashes cover model config and items) and the alignment options."""
    # Resources change where scores are computed, not what they are.
    scoring = {k: v for k, v in asdict(options).items() if k not in _RESOURCE_FIELDS}
    payload = json.dumps(
        [
            lake.committed(dataset, vision).get(NO_PERTURBATION),
            lake.committed(dataset, language).get(NO_PERTURBATION),
            scoring,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_align(
    lake: Lake | str,
    datasets: list[str],
    specs: list[ModelSpec],
    options: AlignOptions,
    only_changed: bool = False,
) -> list[dict]:
    """Fan out one Ray task per (vision model, language model, dataset).

    With ``only_changed``, pairs whose results were computed from the same inputs (embedding
    partitions and options) are skipped and reported with ``"skipped": True``.
    """
    lake = Lake(lake) if isinstance(lake, str) else lake
    vision = [s for s in specs if s.modality == "vision"]
    language = [s for s in specs if s.modality == "language"]
    if not vision or not language:
        raise ValueError("alignment needs at least one vision and one language model")
    jobs, skipped = [], []
    for ds in datasets:
        for v in vision:
            for t in language:
                current = lake.results_inputs_hash("layerwise", results_name(ds, v.name, t.name))
                if only_changed and current == inputs_hash(lake, ds, v.name, t.name, options):
                    skipped.append(
                        {
                            "dataset": ds,
                            "vision_model": v.name,
                            "language_model": t.name,
                            "skipped": True,
                        }
                    )
                else:
                    jobs.append((ds, v, t))
    if not jobs:
        return skipped
    ensure_ray()
    gpus = options.gpus_per_task
    if gpus is None:
        gpus = 0.25 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    task = ray.remote(align_pair).options(num_cpus=options.cpus_per_task, num_gpus=gpus)
    run_id = new_run_id()
    with lake.writer_lock(run_id):
        refs = [
            task.remote(lake.uri, ds, v.model_dump(), t.model_dump(), options, run_id)
            for ds, v, t in jobs
        ]
        try:
            return skipped + ray.get(refs)
        finally:
            lake.discard(run_id)
