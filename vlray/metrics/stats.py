"""Bootstrap confidence intervals and permutation nulls for whole layer grids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from .engine import setup
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
        p_value: one-sided ``(1 + #(null >= value)) / (1 + n_permutations)`` (NaN without).
        n: number of items (rows).
    """

    value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    null_mean: np.ndarray
    p_value: np.ndarray
    n: int


def _count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise MetricInputError(f"{name} must be a non-negative integer, got {v!r}")
    return int(v)


def _replicates(problem: Any, n_boot: int, seed: int) -> np.ndarray:
    """The grid on ``n_boot`` item resamples; resample b depends only on (seed, n, b)."""
    n = problem.n
    rng = np.random.default_rng([seed, 0])
    reps = np.empty((n_boot, len(problem.xs), len(problem.ys)))
    for b in range(n_boot):
        rows = torch.from_numpy(rng.integers(0, n, size=n))
        rctx = problem.context(rows)
        try:
            reps[b] = problem.evaluate(*problem.sides(rctx), rctx)
        except MetricInputError as e:
            raise MetricInputError(f"bootstrap resample {b}: {e}") from None
    return reps


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
    n_boot = _count("n_bootstrap", n_bootstrap)
    _count("seed", seed)
    problem = setup(Xs, Ys, metric, labels_x, labels_y, device, dtype, kw)
    return _replicates(problem, n_boot, seed)


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
    independent, so adding permutations does not change the interval.

    Returns:
        GridStats with ``(len(Xs), len(Ys))`` arrays.
    """
    n_boot = _count("n_bootstrap", n_bootstrap)
    n_perm = _count("n_permutations", n_permutations)
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, (int, float))
        or not 0 < confidence < 1
    ):
        raise MetricInputError(f"confidence must be in (0, 1), got {confidence!r}")
    _count("seed", seed)
    problem = setup(Xs, Ys, metric, labels_x, labels_y, device, dtype, kw)
    n = problem.n
    ctx = problem.context()
    sx, sy = problem.sides(ctx)
    value = problem.evaluate(sx, sy, ctx)
    nan = np.full_like(value, np.nan)
    ci_low, ci_high, null_mean, p_value = nan, nan.copy(), nan.copy(), nan.copy()

    if n_boot:
        reps = _replicates(problem, n_boot, seed)
        alpha = (1.0 - confidence) / 2
        ci_low, ci_high = np.quantile(reps, [alpha, 1.0 - alpha], axis=0)

    if n_perm:
        rng = np.random.default_rng([seed, 1])
        exceed = np.zeros(value.shape)
        total = np.zeros(value.shape)
        threshold = value - _TIE_TOLERANCE * np.maximum(1.0, np.abs(value))
        for _ in range(n_perm):
            perm = torch.from_numpy(rng.permutation(n)).to(problem.device)
            null = problem.evaluate(sx, problem.metric.permute(sy, perm), ctx)
            total += null
            exceed += null >= threshold
        null_mean = total / n_perm
        p_value = (1.0 + exceed) / (1.0 + n_perm)

    return GridStats(value, ci_low, ci_high, null_mean, p_value, n)


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
