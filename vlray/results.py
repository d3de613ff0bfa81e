"""The results table ``alignment``: long format, one row per score (see DESIGN.md)."""

from __future__ import annotations

import datetime as _dt

import numpy as np
import pyarrow as pa

STUDIES = ("layerwise", "perturbation", "forced_choice", "exemplar", "concept_retrieval")

ALIGNMENT_SCHEMA = pa.schema(
    [
        ("study", pa.string()),
        ("dataset", pa.string()),
        ("vision_model", pa.string()),
        ("language_model", pa.string()),
        ("vision_layer", pa.int16()),
        ("language_layer", pa.int16()),
        ("metric", pa.string()),
        ("condition", pa.string()),
        ("value", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("null_mean", pa.float64()),
        ("p_value", pa.float64()),
        ("n", pa.int64()),
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _or_none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def grid_rows(
    stats,
    *,
    study: str,
    dataset: str,
    vision_model: str,
    language_model: str,
    metric: str,
    condition: str,
    run_id: str,
) -> list[dict]:
    """One row per (vision layer, language layer) of a ``GridStats``."""
    now = _dt.datetime.now(_dt.UTC)
    rows = []
    for i in range(stats.value.shape[0]):
        for j in range(stats.value.shape[1]):
            rows.append(
                {
                    "study": study,
                    "dataset": dataset,
                    "vision_model": vision_model,
                    "language_model": language_model,
                    "vision_layer": i,
                    "language_layer": j,
                    "metric": metric,
                    "condition": condition,
                    "value": float(stats.value[i, j]),
                    "ci_low": _or_none(stats.ci_low[i, j]),
                    "ci_high": _or_none(stats.ci_high[i, j]),
                    "null_mean": _or_none(stats.null_mean[i, j]),
                    "p_value": _or_none(stats.p_value[i, j]),
                    "n": int(stats.n),
                    "run_id": run_id,
                    "created_at": now,
                }
            )
    return rows


def alignment_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ALIGNMENT_SCHEMA)
