"""The results table ``alignment``: long format, one row per score (README, "The five studies")."""

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


def _or_none(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def score_row(
    *,
    study: str,
    dataset: str,
    vision_model: str,
    language_model: str,
    vision_layer: int | None,
    language_layer: int | None,
    metric: str,
    condition: str,
    value: float,
    n: int,
    run_id: str,
    ci_low: float | None = None,
    ci_high: float | None = None,
    null_mean: float | None = None,
    p_value: float | None = None,
) -> dict:
    """One row of the alignment table; non-finite statistics become null.

    A non-finite score is refused: it would sort above every real score in SQL (NaN is the
    largest DOUBLE in DuckDB) and, written to Parquet, hide from ``isnan`` filters that trust
    the file's min/max statistics.
    """
    if not np.isfinite(value):
        raise ValueError(
            f"{study} on {dataset}, {vision_model} x {language_model}, layers "
            f"({vision_layer}, {language_layer}), {metric} / {condition}: the score is {value}"
        )
    return {
        "study": study,
        "dataset": dataset,
        "vision_model": vision_model,
        "language_model": language_model,
        "vision_layer": vision_layer,
        "language_layer": language_layer,
        "metric": metric,
        "condition": condition,
        "value": float(value),
        "ci_low": _or_none(ci_low),
        "ci_high": _or_none(ci_high),
        "null_mean": _or_none(null_mean),
        "p_value": _or_none(p_value),
        "n": int(n),
        "run_id": run_id,
        "created_at": _dt.datetime.now(_dt.UTC),
    }


def grid_rows(stats, *, metric: str, condition: str, **where) -> list[dict]:
    """One row per (vision layer, language layer) of a ``GridStats``; ``where`` holds study,
    dataset, vision_model, language_model and run_id."""
    return [
        score_row(
            **where,
            vision_layer=i,
            language_layer=j,
            metric=metric,
            condition=condition,
            value=stats.value[i, j],
            ci_low=stats.ci_low[i, j],
            ci_high=stats.ci_high[i, j],
            null_mean=stats.null_mean[i, j],
            p_value=stats.p_value[i, j],
            n=stats.n,
        )
        for i in range(stats.value.shape[0])
        for j in range(stats.value.shape[1])
    ]


def alignment_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ALIGNMENT_SCHEMA)


# The ``study_log`` table: the outcome of the latest run of each (study, dataset, vision model,
# language model), so that the report can show what was skipped, failed or ran on too few
# items. One row per study outcome (``metric`` null) and one per metric that was skipped or
# warned about; a re-run replaces the rows of its key, like the scores.
STUDY_LOG_SCHEMA = pa.schema(
    [
        ("study", pa.string()),
        ("dataset", pa.string()),
        ("vision_model", pa.string()),
        ("language_model", pa.string()),
        ("metric", pa.string()),  # null: the whole study
        ("status", pa.string()),  # one of STUDY_STATUSES
        ("reason", pa.string()),  # why skipped or failed, what the warning says; null if written
        ("n", pa.int64()),  # items the study scored; null when it did not get that far
        ("rows", pa.int64()),  # scores written
        # what the outcome was computed from (as the scores' inputs_hash): a refresh does not
        # rerun a study skipped on the same inputs
        ("inputs_hash", pa.string()),
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
# written: scores committed; skipped: the dataset lacks the inputs (whole study) or the items
# are too few for the metric; failed: an error; small_n: scores written, but from fewer items
# than the study's documented minimum for stable statistics.
STUDY_STATUSES = ("written", "skipped", "failed", "small_n")


def study_log_row(
    *,
    study: str,
    dataset: str,
    vision_model: str,
    language_model: str,
    status: str,
    run_id: str,
    metric: str | None = None,
    reason: str | None = None,
    n: int | None = None,
    rows: int = 0,
    inputs_hash: str | None = None,
) -> dict:
    """One row of the ``study_log`` table."""
    if status not in STUDY_STATUSES:
        raise ValueError(f"study_log status {status!r}: not one of {', '.join(STUDY_STATUSES)}")
    return {
        "study": study,
        "dataset": dataset,
        "vision_model": vision_model,
        "language_model": language_model,
        "metric": metric,
        "status": status,
        "reason": reason,
        "n": n,
        "rows": rows,
        "inputs_hash": inputs_hash,
        "run_id": run_id,
        "created_at": _dt.datetime.now(_dt.UTC),
    }


def study_log_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STUDY_LOG_SCHEMA)
