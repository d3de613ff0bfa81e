"""Layerwise alignment: every (vision layer, language layer) pair, with bootstrap CIs and a
permutation null (He, Trott & Khosla 2025; the field's standard comparison)."""

from __future__ import annotations

from vlray import metrics
from vlray.results import grid_rows

from .inputs import StudyInputs, layer_labels


def run(inputs: StudyInputs, run_id: str) -> list[dict]:
    """One row per (metric, vision layer, language layer), condition ``none``."""
    options = inputs.options
    v, t = inputs.pairs()
    rows = []
    for metric in options.metrics:
        stats = metrics.grid_stats(
            v.layers,
            t.layers,
            metric,
            n_bootstrap=options.bootstrap,
            n_permutations=options.permutations,
            confidence=options.confidence,
            seed=options.seed,
            labels_x=layer_labels(v),
            labels_y=layer_labels(t),
            **options.metric_kw(metric),
        )
        rows += grid_rows(
            stats, metric=metric, condition="none", **inputs.where("layerwise", run_id)
        )
    return rows
