"""The results table ``alignment``: long format, one row per score (README, "The five studies")."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa

from vlray.items import NO_PERTURBATION, perturbation_family


@dataclass(frozen=True)
class Condition:
    """What a score was computed under, in typed parts: the columns that follow ``condition``
    in the results table. A study fills its own parts and leaves the others None (README, "The
    results table"); ``label`` makes the readable ``condition`` from them, the one place where
    it is made, so that the label and the columns cannot disagree."""

    k: int | None = None  # exemplar: exemplars averaged per concept (1, 2, 4, ...)
    averaged_side: str | None = None  # exemplar: the side averaged, image | text | both
    direction: str | None = None  # forced_choice: text_to_image | image_to_text
    # forced_choice: the trials' kind, lexical | binding | relation; None for trials without a kind
    trial_kind: str | None = None
    # perturbation: ``none`` (the unperturbed grid) or FAMILY/NAME, as in the embeddings
    # table; None on a family's pooled drop
    perturbation: str | None = None
    perturbation_family: str | None = None  # perturbation: FAMILY (of NAME, or pooled)
    retrieval: str | None = None  # concept_retrieval: nn (cosine) | csls
    breakdown: str | None = None  # concept_retrieval: dispersion | frequency | polysemy
    bin: str | None = None  # concept_retrieval: the breakdown's third, low | mid | high

    def __post_init__(self) -> None:
        if (self.breakdown is None) != (self.bin is None):
            raise ValueError(f"a breakdown needs its bin, and a bin its breakdown: {self}")
        if self.perturbation is not None:
            family = (
                None
                if self.perturbation == NO_PERTURBATION
                else perturbation_family(self.perturbation)
            )
            if self.perturbation_family != family:
                raise ValueError(f"perturbation_family must be {family!r}: {self}")

    @property
    def label(self) -> str:
        """The readable ``condition``: the parts that are set, joined by '/' (``k=4/image``,
        ``text_to_image``, ``text_to_image/binding``, ``image_semantic/replace``,
        ``image_semantic`` for a family's pooled drop, ``nn/frequency=low``); ``none`` when no
        part is set (layerwise)."""
        parts = [
            None if self.k is None else f"k={self.k}",
            self.averaged_side,
            self.direction,
            self.trial_kind,
            # a perturbation's name starts with its family: the family alone marks a pooled row
            self.perturbation or self.perturbation_family,
            self.retrieval,
            None if self.breakdown is None else f"{self.breakdown}={self.bin}",
        ]
        return "/".join(p for p in parts if p) or "none"

    def columns(self) -> dict[str, int | str | None]:
        """The parts as results-table columns (``CONDITION_COLUMNS``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Metric:
    """A metric made of typed parts: the columns that follow ``metric`` in the results table.
    A plain metric (``cka``, ``accuracy``, ...) is named by its string and has no parts (its
    columns are null); a ``Metric`` is exactly one of the kinds below, and ``label`` makes its
    readable ``metric`` from the part, the one place where it is made."""

    top_k: int | None = None  # concept_retrieval: precision among the top K words, ``p@K``
    drop_of: str | None = None  # perturbation: the metric whose drop this is, ``METRIC_drop``

    def __post_init__(self) -> None:
        if (self.top_k is None) == (self.drop_of is None):
            raise ValueError(f"a Metric is a P@K (top_k) or a drop (drop_of), one of them: {self}")

    @property
    def label(self) -> str:
        """The readable ``metric``: ``p@10``, ``cka_drop``."""
        if self.top_k is not None:
            return f"p@{self.top_k}"
        return f"{self.drop_of}_drop"

    def columns(self) -> dict[str, int | str | None]:
        """The parts as results-table columns (``METRIC_COLUMNS``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _typed_fields(parts: type) -> tuple[pa.Field, ...]:
    """A parts dataclass's columns, typed from its fields (their annotations are strings here)."""
    types = {"int | None": pa.int32(), "str | None": pa.string()}
    return tuple(pa.field(f.name, types[f.type]) for f in fields(parts))


CONDITION_FIELDS = _typed_fields(Condition)
CONDITION_COLUMNS = tuple(f.name for f in CONDITION_FIELDS)
METRIC_FIELDS = _typed_fields(Metric)
METRIC_COLUMNS = tuple(f.name for f in METRIC_FIELDS)


def metric_columns(metric: str | Metric) -> dict[str, int | str | None]:
    """``metric`` and its typed parts as results-table columns: a plain metric's name with its
    parts null, or a ``Metric``'s label with its parts."""
    if isinstance(metric, Metric):
        return {"metric": metric.label, **metric.columns()}
    return {"metric": metric, **dict.fromkeys(METRIC_COLUMNS)}


ALIGNMENT_SCHEMA = pa.schema(
    [
        ("study", pa.string()),
        ("dataset", pa.string()),
        ("vision_model", pa.string()),
        ("language_model", pa.string()),
        ("vision_layer", pa.int16()),
        ("language_layer", pa.int16()),
        ("metric", pa.string()),  # a plain metric's name, or Metric.label of the parts below
        *METRIC_FIELDS,
        ("condition", pa.string()),  # Condition.label of the typed parts that follow
        *CONDITION_FIELDS,
        ("value", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("null_mean", pa.float64()),
        ("null_sd", pa.float64()),  # the null's spread: permutation replicates' sd (ddof=1)
        ("calibrated", pa.float64()),  # value - null_mean (score_row makes it)
        ("z_score", pa.float64()),  # (value - null_mean) / null_sd (score_row makes it)
        ("p_value", pa.float64()),
        ("n", pa.int64()),
        ("run_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _or_none(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def calibrate(
    value: float | None, null_mean: float | None, null_sd: float | None
) -> tuple[float | None, float | None]:
    """The null-calibrated score and its z-score, the one definition of both (README, "The
    results table"): ``calibrated = value - null_mean``, null without a null mean, and
    ``z_score = (value - null_mean) / null_sd``, null without a null mean or with a null spread
    that is null or 0; a non-finite input counts as missing. Raw scores rise with width, depth
    and sample size even for unrelated data; the calibrated ones are the excess over what the
    same data with the pairing broken scores, in its units or in null standard deviations.
    """
    mean, sd = _or_none(null_mean), _or_none(null_sd)
    if value is None or mean is None:
        return None, None
    calibrated = _or_none(value - mean)
    z_score = None if calibrated is None or not sd else _or_none(calibrated / sd)
    return calibrated, z_score


def score_row(
    *,
    study: str,
    dataset: str,
    vision_model: str,
    language_model: str,
    vision_layer: int | None,
    language_layer: int | None,
    metric: str | Metric,
    condition: Condition,
    value: float,
    n: int,
    run_id: str,
    ci_low: float | None = None,
    ci_high: float | None = None,
    null_mean: float | None = None,
    null_sd: float | None = None,
    p_value: float | None = None,
) -> dict:
    """One row of the alignment table: ``metric``'s and ``condition``'s labels, each with its
    typed parts; non-finite statistics become null.

    ``calibrated`` and ``z_score`` are made from ``value``, ``null_mean`` and ``null_sd`` by
    :func:`calibrate`, never passed in.

    A non-finite score is refused: it would sort above every real score in SQL (NaN is the
    largest DOUBLE in DuckDB) and, written to Parquet, hide from ``isnan`` filters that trust
    the file's min/max statistics.
    """
    metric_parts = metric_columns(metric)
    if not np.isfinite(value):
        raise ValueError(
            f"{study} on {dataset}, {vision_model} x {language_model}, layers "
            f"({vision_layer}, {language_layer}), {metric_parts['metric']} / {condition.label}: "
            f"the score is {value}"
        )
    calibrated, z_score = calibrate(value, null_mean, null_sd)
    return {
        "study": study,
        "dataset": dataset,
        "vision_model": vision_model,
        "language_model": language_model,
        "vision_layer": vision_layer,
        "language_layer": language_layer,
        **metric_parts,
        "condition": condition.label,
        **condition.columns(),
        "value": float(value),
        "ci_low": _or_none(ci_low),
        "ci_high": _or_none(ci_high),
        "null_mean": _or_none(null_mean),
        "null_sd": _or_none(null_sd),
        "calibrated": calibrated,
        "z_score": z_score,
        "p_value": _or_none(p_value),
        "n": int(n),
        "run_id": run_id,
        "created_at": _dt.datetime.now(_dt.UTC),
    }


def grid_rows(stats, *, metric: str | Metric, condition: Condition, **where) -> list[dict]:
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
            null_sd=stats.null_sd[i, j],
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
