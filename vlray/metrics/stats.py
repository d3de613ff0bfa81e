"""Bootstrap confidence intervals and permutation nulls for whole layer grids."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from .engine import Problem, get_metric, setup
from .inputs import MetricInputError

# Counts a null replicate as reaching the observed score when within rounding of it, so that
# a permutation equivalent to the identity never looks "significantly" different from it.
_TIE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class GridStats:
    """Scores of a layer grid with their uncertainty; arrays have the grid's shape.

    Attributes:
        value: the scores on the data as given.
        ci_low, ci_high: percentile bootstrap interval (NaN without ``n_bootstrap``).
        null_mean: mean score with the pairing shuffled (NaN without ``n_permutations``).
        null_sd: standard deviation (ddof=1) of the scores with the pairing shuffled (NaN
            without at least 2 permutations); the results table's ``z_score`` divides by it.
        p_value: one-sided ``(1 + #(null >= value)) / (1 + n_permutations)`` (NaN without).
        n: number of items (rows).
    """

    value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    null_mean: np.ndarray
    null_sd: np.ndarray
    p_value: np.ndarray
    n: int


def check_count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise MetricInputError(f"{name} must be a non-negative integer, got {v!r}")
    return int(v)


# The chance, over all of a run's resamples, that one has too few distinct items for the metric.
_SHORT_RESAMPLE_RISK = 0.01


def short_resample_chance(n: int, need: int) -> float:
    """P(a bootstrap resample of ``n`` items has fewer than ``need`` distinct items), exactly."""
    return float(_distinct_cdf(n)[min(need, n + 1) - 1]) if need > 0 else 0.0


@functools.lru_cache(maxsize=1024)
def _distinct_cdf(n: int) -> np.ndarray:
    """P(distinct items <= d) for d = 0..n in a bootstrap resample of ``n`` items: the count
    after each of the n draws (a draw adds a new item with probability (n - d) / n)."""
    d = np.arange(n + 1)
    p = np.zeros(n + 1)
    p[0] = 1.0
    for _ in range(n):
        move = p * (n - d) / n
        p = p * d / n
        p[1:] += move[:-1]
    return np.cumsum(p)


def min_items(metric: str, bootstrap: int = 0, **kwargs: Any) -> tuple[int, str]:
    """The fewest items ``metric`` (with options ``kwargs``) can score, and why.

    A metric needs ``need`` distinct items (``k + 1`` for the neighbour metrics, 4 for the
    unbiased HSIC, ...). With bootstrap resampling every resample must have them too, and a
    resample holds only about 63% of the items distinct: the minimum is then the smallest n
    at which the chance that any of the ``bootstrap`` resamples falls short is under 1%.

    >>> min_items("mutual_knn", k=10)
    (11, 'k=10 neighbours besides the item itself')
    >>> min_items("mutual_knn", bootstrap=100, k=10)[0]
    26
    """
    impl = get_metric(metric)
    need, why = impl.min_rows(impl.options(kwargs))
    if not check_count("bootstrap", bootstrap):
        return need, why
    n = need
    while bootstrap * short_resample_chance(n, need) > _SHORT_RESAMPLE_RISK:
        n += 1
    return n, (why + "; " if why else "") + f"{need} distinct in every bootstrap resample"


# Options that set how many items a metric needs, with their smallest values, in the order
# they are lowered to fit a small dataset.
_SIZE_OPTIONS = {"k": 1, "csls_k": 1, "folds": 2}


def fit_options(metric: str, n: int, bootstrap: int = 0, **kwargs: Any) -> dict | None:
    """The size options (``k``, ``csls_k``, ``folds``) to change so that ``metric`` can score
    ``n`` items: ``{}`` if it already can, the largest values that fit otherwise, or None
    when no value of them does (too few items for the metric at all).

    >>> fit_options("mutual_knn", 17, bootstrap=100)
    {'k': 5}
    """
    impl = get_metric(metric)
    opts = impl.options(kwargs)
    if min_items(metric, bootstrap, **kwargs)[0] <= n:
        return {}
    changed: dict[str, int] = {}
    for name, floor in _SIZE_OPTIONS.items():
        if name not in opts:
            continue
        for value in range(opts[name] - 1, floor - 1, -1):
            changed[name] = value
            try:
                if min_items(metric, bootstrap, **{**kwargs, **changed})[0] <= n:
                    return changed
            except MetricInputError:  # below the metric's own floor for this option
                changed[name] = value + 1
                break
    return None


def bootstrap_rows(seed: int, n: int, index: int) -> np.ndarray:
    """The rows of bootstrap resample ``index``: a function of (seed, n, index) only, so any
    shard of the resamples can be computed anywhere and in any order."""
    return np.random.default_rng([seed, 0, index]).integers(0, n, size=n)


def permutation_order(seed: int, n: int, index: int) -> np.ndarray:
    """The row order of permutation ``index`` of the null: a function of (seed, n, index)."""
    return np.random.default_rng([seed, 1, index]).permutation(n)


def replicates(problem: Problem, indices: Sequence[int], seed: int) -> np.ndarray:
    """The grid on the bootstrap resamples ``indices``: ``(len(indices), X, Y)``."""
    reps = np.empty((len(indices), len(problem.xs), len(problem.ys)))
    for out, b in enumerate(indices):
        rctx = problem.context(torch.from_numpy(bootstrap_rows(seed, problem.n, b)))
        try:
            reps[out] = problem.evaluate(*problem.sides(rctx), rctx)
        except MetricInputError as e:
            raise MetricInputError(f"bootstrap resample {b}: {e}") from None
    return reps


def null_scores(
    problem: Problem, sx: Any, sy: Any, indices: Sequence[int], seed: int
) -> np.ndarray:
    """The grid with the pairing shuffled by permutations ``indices``: ``(len, X, Y)``.

    ``sx`` and ``sy`` are the sides of the data as given; Y's per-layer work is permuted, not
    redone."""
    ctx = problem.context()
    nulls = np.empty((len(indices), len(problem.xs), len(problem.ys)))
    for out, p in enumerate(indices):
        perm = torch.from_numpy(permutation_order(seed, problem.n, p)).to(problem.device)
        nulls[out] = problem.evaluate(sx, problem.metric.permute(sy, perm), ctx)
    return nulls


def summarise(
    value: np.ndarray,
    reps: np.ndarray | None,
    nulls: np.ndarray | None,
    confidence: float,
    n: int,
) -> GridStats:
    """GridStats from the grid's value, its bootstrap replicates and its null scores (either
    may be None or empty: its fields are then NaN)."""
    nan = np.full_like(value, np.nan)
    ci_low, ci_high, null_mean, p_value = nan, nan.copy(), nan.copy(), nan.copy()
    null_sd = nan.copy()
    if reps is not None and len(reps):
        alpha = (1.0 - confidence) / 2
        ci_low, ci_high = np.quantile(reps, [alpha, 1.0 - alpha], axis=0)
    if nulls is not None and len(nulls):
        threshold = value - _TIE_TOLERANCE * np.maximum(1.0, np.abs(value))
        null_mean = nulls.mean(axis=0)
        if len(nulls) >= 2:
            null_sd = nulls.std(axis=0, ddof=1)
        p_value = (1.0 + (nulls >= threshold).sum(axis=0)) / (1.0 + len(nulls))
    return GridStats(
        value=value,
        ci_low=ci_low,
        ci_high=ci_high,
        null_mean=null_mean,
        null_sd=null_sd,
        p_value=p_value,
        n=n,
    )


def check_confidence(confidence: Any) -> float:
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, (int, float))
        or not 0 < confidence < 1
    ):
        raise MetricInputError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(confidence)


def bootstrap_replicates(
    Xs: Sequence[ArrayLike],
    Ys: Sequence[ArrayLike],
    metric: str,
    *,
    n_bootstrap: int,
    seed: int = 0,
    labels_x: Sequence[str] | None = None,
    labels_y: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kw: Any,
) -> np.ndarray:
    """The grid recomputed on each of ``n_bootstrap`` item resamples: ``(n_bootstrap, X, Y)``.

    Resample b is the same for every call with the same ``seed`` and number of items, and the
    same as :func:`grid_stats` uses, so two calls over the same items give paired replicates:
    the interval of a difference between two scores comes from their replicate differences.
    """
    n_boot = check_count("n_bootstrap", n_bootstrap)
    check_count("seed", seed)
    problem = setup(Xs, Ys, metric, labels_x, labels_y, device, dtype, kw)
    return replicates(problem, range(n_boot), seed)


def grid_stats(
    Xs: Sequence[ArrayLike],
    Ys: Sequence[ArrayLike],
    metric: str,
    *,
    n_bootstrap: int = 0,
    n_permutations: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    labels_x: Sequence[str] | None = None,
    labels_y: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kw: Any,
) -> GridStats:
    """:func:`grid` with a bootstrap interval and a permutation null for every pair.

    Bootstrap: items (rows) are resampled with replacement, the same resample for every layer
    of both sides, and the whole grid is recomputed on each resample through the batched
    path. How metrics treat the copies of an item: kNN metrics (mutual_knn, cknna) never let
    a copy be its item's neighbour and order copies of a neighbour identically in both spaces
    (see :mod:`vlray.metrics.knn`); rsa leaves out pairs of copies; the cross-validated
    metrics keep copies in one fold and never count a copy as a retrieval rival; the CKA and
    CCA metrics use the repeated rows as they are (a weighted sample).

    Permutation null: Y's rows are permuted (the pairing shuffled) and the grid rescored.
    Per-layer precomputation (neighbour lists, Gram vectors, SVDs) is permuted, not redone.

    The same ``seed`` gives the same numbers; the bootstrap and permutation streams are
    independent, so adding permutations does not change the interval. Resample b and
    permutation p depend only on (seed, n, b or p) (:func:`bootstrap_rows`,
    :func:`permutation_order`), so a grid split into shards of layers and of resamples (see
    :mod:`vlray.shards`) gives these numbers too.

    Returns:
        GridStats with ``(len(Xs), len(Ys))`` arrays.
    """
    n_boot = check_count("n_bootstrap", n_bootstrap)
    n_perm = check_count("n_permutations", n_permutations)
    confidence = check_confidence(confidence)
    check_count("seed", seed)
    problem = setup(Xs, Ys, metric, labels_x, labels_y, device, dtype, kw)
    ctx = problem.context()
    sx, sy = problem.sides(ctx)
    value = problem.evaluate(sx, sy, ctx)
    reps = replicates(problem, range(n_boot), seed)
    nulls = null_scores(problem, sx, sy, range(n_perm), seed)
    return summarise(value, reps, nulls, confidence, problem.n)


def score_stats(
    X: ArrayLike,
    Y: ArrayLike,
    metric: str,
    *,
    label_x: str = "X",
    label_y: str = "Y",
    **kw: Any,
) -> GridStats:
    """:func:`grid_stats` for one pair of arrays: a 1 x 1 :class:`GridStats`."""
    return grid_stats([X], [Y], metric, labels_x=[label_x], labels_y=[label_y], **kw)
