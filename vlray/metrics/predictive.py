"""Cross-validated mapping metrics: ridge linear predictivity and Procrustes retrieval.

Neither batches into one product (every pair fits its own map), but each reuses per-layer
work: linear predictivity decomposes each source layer once per fold and predicts all target
layers at once; Procrustes retrieval computes each layer's PCA once. Computed in float64.

Cross-validation folds are sklearn's ``KFold(folds, shuffle=True, random_state=fold_seed)``.
Under bootstrap resampling the folds split distinct items, so the copies of an item are never
on both sides of a split (that would leak the answer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .base import Metric
from .inputs import Context, LayerInput, MetricInputError, choice_option, int_option

DEFAULT_ALPHAS = tuple(10.0**e for e in range(-3, 7))


def kfold(n: int, folds: int, seed: int, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Test indices of each fold: ``KFold(folds, shuffle=True, random_state=seed)``.

    With ``groups`` (item identity per row) the distinct items are split, not the rows.
    """
    if groups is None:
        # KFold shuffles arange(n) with RandomState(seed), then splits as array_split does.
        return np.array_split(np.random.RandomState(seed).permutation(n), folds)
    _, inverse = np.unique(groups, return_inverse=True)
    parts = np.array_split(np.random.RandomState(seed).permutation(inverse.max() + 1), folds)
    return [np.flatnonzero(np.isin(inverse, part)) for part in parts]


@dataclass(frozen=True)
class DataSide:
    """Preprocessed layers (float64, on the compute device)."""

    labels: list[str]
    xs: list[torch.Tensor]

    def permuted(self, perm: torch.Tensor) -> DataSide:
        return replace(self, xs=[x[perm] for x in self.xs])


def _folds(n: int, opts: Mapping[str, Any], ctx: Context) -> list[torch.Tensor]:
    groups = None if ctx.rows is None else ctx.rows.cpu().numpy()
    if groups is not None and len(np.unique(groups)) < opts["folds"]:
        raise MetricInputError(
            f"bootstrap resample has fewer distinct items than folds={opts['folds']}"
        )
    return [
        torch.as_tensor(t, device=ctx.device)
        for t in kfold(n, opts["folds"], opts["fold_seed"], groups)
    ]


def ridge_cv_predict(
    x: torch.Tensor,
    y: torch.Tensor,
    block_of_column: torch.Tensor,
    folds: Sequence[torch.Tensor],
    alphas: Sequence[float],
) -> torch.Tensor:
    """Out-of-fold ridge predictions of ``y`` from ``x``, the penalty chosen inside each fold.

    In each training fold, every alpha's exact leave-one-out error comes from one SVD of the
    centred training inputs (ridge with an unpenalised intercept: hat diagonal
    ``1/n + sum_k u_ik^2 s_k^2 / (s_k^2 + alpha)``; Rifkin & Lippert 2007), and the alpha with
    the lowest mean squared LOO error over a target block's columns is used for that block
    (first on ties). That is ``RidgeCV(alphas)`` per block, fitted to all blocks at once.
    """
    n_blocks = int(block_of_column.max()) + 1
    width = torch.bincount(block_of_column, minlength=n_blocks).to(y.dtype)
    alpha_t = torch.tensor(list(alphas), dtype=y.dtype, device=y.device)
    preds = torch.empty_like(y)
    for test in folds:
        train = torch.ones(len(x), dtype=torch.bool, device=x.device)
        train[test] = False
        x_mean, y_mean = x[train].mean(dim=0), y[train].mean(dim=0)
        yc = y[train] - y_mean
        u, s, vh = torch.linalg.svd(x[train] - x_mean, full_matrices=False)
        uty = u.T @ yc
        s2 = s * s
        u2 = u * u
        best = torch.full((n_blocks,), math.inf, dtype=y.dtype, device=y.device)
        chosen = torch.zeros(n_blocks, dtype=torch.long, device=y.device)
        for i, alpha in enumerate(alphas):
            shrink = s2 / (s2 + alpha)
            hat = 1.0 / len(yc) + u2 @ shrink
            loo = (yc - u @ (shrink[:, None] * uty)) / (1.0 - hat)[:, None]
            err = torch.zeros(n_blocks, dtype=y.dtype, device=y.device)
            err.index_add_(0, block_of_column, loo.square().mean(dim=0))
            err /= width
            better = err < best
            best = torch.where(better, err, best)
            chosen = torch.where(better, i, chosen)
        col_alpha = alpha_t[chosen][block_of_column]
        coef = vh.T @ (s[:, None] / (s2[:, None] + col_alpha[None, :]) * uty)
        preds[test] = y_mean + (x[test] - x_mean) @ coef
    return preds


def column_pearson(y: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson r of each column of ``y`` with the same column of ``p``, and which are defined.

    Constant target columns are undefined (left out of means). A constant prediction of a
    varying target carries no linear information and scores 0.
    """
    yc, pc = y - y.mean(dim=0), p - p.mean(dim=0)
    den = torch.sqrt(yc.square().sum(dim=0) * pc.square().sum(dim=0))
    r = torch.where(den > 0, (yc * pc).sum(dim=0) / den, 0.0)
    return r, y.amax(dim=0) > y.amin(dim=0)


class LinearPredictivity(Metric):
    """Cross-validated linear predictivity (as in Yamins et al. PNAS 2014; Schrimpf et al. 2018).

    Ridge regression from one layer to the other (``direction="x_to_y"``: X predicts Y), the
    penalty chosen from ``alphas`` by exact leave-one-out CV inside each training fold
    (sklearn ``RidgeCV``), outer ``folds``-fold CV; the score is the mean over the target's
    dimensions of the Pearson r between held-out predictions (pooled over folds) and targets.
    Constant target columns are left out of the mean.

    Options: ``direction="x_to_y"``, ``alphas`` = 1e-3 ... 1e6 (10 log-spaced, absolute: use
    ``l2=True`` or standardised inputs if the scale is far from unit), ``folds=5``,
    ``fold_seed=0``; preprocessing ``center=True``, ``l2=False``, ``clamp_quantile=None``.
    """

    name = "linear_predictivity"
    defaults = {
        "direction": "x_to_y",
        "alphas": DEFAULT_ALPHAS,
        "folds": 5,
        "fold_seed": 0,
        "center": True,
        "l2": False,
        "clamp_quantile": None,
    }

    def check(self, opts):
        choice_option(self.name, opts, "direction", ("x_to_y", "y_to_x"))
        int_option(self.name, opts, "folds", 2)
        int_option(self.name, opts, "fold_seed", 0)
        alphas = opts["alphas"]
        try:
            ok = len(alphas) > 0 and all(float(a) > 0 and math.isfinite(float(a)) for a in alphas)
        except TypeError:
            ok = False
        if not ok:
            raise MetricInputError(
                f"{self.name}: alphas must be a non-empty list of positive numbers"
            )
        opts["alphas"] = tuple(float(a) for a in alphas)

    def min_rows(self, opts):
        return max(2 * opts["folds"], 4), f"{opts['folds']} folds of at least 2 items"

    def side(self, layers, opts, ctx) -> DataSide:
        xs = [ctx.load(layer, opts, dtype=torch.float64) for layer in layers]
        return DataSide([layer.label for layer in layers], xs)

    def pairs(self, sx: DataSide, sy: DataSide, opts, ctx):
        src, dst = (sx, sy) if opts["direction"] == "x_to_y" else (sy, sx)
        folds = _folds(ctx.n, opts, ctx)
        target = torch.cat(dst.xs, dim=1)
        widths = torch.tensor([t.shape[1] for t in dst.xs], device=target.device)
        block = torch.repeat_interleave(torch.arange(len(dst.xs), device=target.device), widths)
        out = torch.empty((len(src.xs), len(dst.xs)), dtype=torch.float64)
        for a, x in enumerate(src.xs):
            preds = ridge_cv_predict(x, target, block, folds, opts["alphas"])
            r, defined = column_pearson(target, preds)
            total = torch.zeros(len(dst.xs), dtype=r.dtype, device=r.device)
            total.index_add_(0, block, torch.where(defined, r, 0.0))
            count = torch.bincount(block[defined], minlength=len(dst.xs))
            if bool((count == 0).any()):
                label = dst.labels[int((count == 0).nonzero()[0])]
                raise MetricInputError(f"{label}: every target column is constant in this sample")
            out[a] = (total / count).cpu()
        return out if opts["direction"] == "x_to_y" else out.T

    def permute(self, sy: DataSide, perm):
        return sy.permuted(perm)


@dataclass(frozen=True)
class PcaSide:
    """Per layer: PCA scores ``(n, min(n, d))`` (components by decreasing variance), width."""

    labels: list[str]
    scores: list[torch.Tensor]
    widths: list[int]

    def permuted(self, perm: torch.Tensor) -> PcaSide:
        return replace(self, scores=[z[perm] for z in self.scores])


def csls(sims: torch.Tensor, k: int) -> torch.Tensor:
    """Cross-domain similarity local scaling (Conneau et al., ICLR 2018).

    ``2 cos(q, c) - r_c(q) - r_q(c)`` with ``r`` the mean similarity to the k nearest of the
    other side (all of it, when it has fewer than k): penalises hubs that are near everything.
    """
    r_query = sims.topk(min(k, sims.shape[1]), dim=1).values.mean(dim=1)
    r_cand = sims.topk(min(k, sims.shape[0]), dim=0).values.mean(dim=0)
    return 2 * sims - r_query[:, None] - r_cand[None, :]


def _outside(test: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask of the rows not in ``test`` (a fold's training rows)."""
    train = torch.ones(n, dtype=torch.bool, device=test.device)
    train[test] = False
    return train


class ProcrustesRetrieval(Metric):
    """Retrieval precision after an orthogonal Procrustes map (Li et al., TACL 2024).

    Li, Kementchedjhieva, Fierro & Sogaard, "Do Vision and Language Models Share Concepts? A
    Vector Space Alignment Study". Both layers are PCA-reduced to the smaller width (and to
    fewer axes than the smallest training fold has rows, where the map is determined); in each of
    ``folds`` folds an orthogonal map (Schonemann 1966) is fitted on the training rows, the
    held-out queries are mapped, and a hit is the right row ranked within the top ``k`` of all
    held-out rows of the other side, by cosine (``retrieval="nn"``) or CSLS (``"csls"``,
    ``csls_k`` neighbours). Returns P@k over all items; chance is about ``k * folds / n``.
    Ties count in the query's favour; bootstrap copies of the query's item are not rivals.

    Options: ``k=1``, ``retrieval="nn"``, ``csls_k=10``, ``direction="x_to_y"`` (X queries
    retrieve Y rows), ``folds=5``, ``fold_seed=0``; preprocessing ``center=True``, ``l2=True``,
    ``clamp_quantile=None``.
    """

    name = "procrustes_retrieval"
    defaults = {
        "k": 1,
        "retrieval": "nn",
        "csls_k": 10,
        "direction": "x_to_y",
        "folds": 5,
        "fold_seed": 0,
        "center": True,
        "l2": True,
        "clamp_quantile": None,
    }

    def check(self, opts):
        int_option(self.name, opts, "k", 1)
        int_option(self.name, opts, "csls_k", 1)
        int_option(self.name, opts, "folds", 2)
        int_option(self.name, opts, "fold_seed", 0)
        choice_option(self.name, opts, "retrieval", ("nn", "csls"))
        choice_option(self.name, opts, "direction", ("x_to_y", "y_to_x"))

    def min_rows(self, opts):
        need = max(opts["k"], opts["csls_k"] if opts["retrieval"] == "csls" else 0) + 1
        return opts["folds"] * need, f"{opts['folds']} test folds of at least {need} items each"

    def side_bytes(self, n: int, width: int, opts: Mapping[str, Any], itemsize: int) -> int:
        return 2 * n * width * 8  # the float64 copy and its PCA scores

    def side(self, layers: Sequence[LayerInput], opts: Mapping[str, Any], ctx: Context) -> PcaSide:
        scores = []
        for layer in layers:
            x = ctx.load(layer, opts, dtype=torch.float64)
            u, s, _ = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)
            scores.append(u * s)
        return PcaSide([layer.label for layer in layers], scores, [layer.width for layer in layers])

    def pairs(self, sx: PcaSide, sy: PcaSide, opts, ctx):
        queries, cands = (sx, sy) if opts["direction"] == "x_to_y" else (sy, sx)
        folds = _folds(ctx.n, opts, ctx)
        groups = ctx.groups()
        # Fewer axes than the smallest training fold has distinct items: past that rank the
        # rotation is undetermined and would turn held-out rows by rounding noise.
        ids = torch.arange(ctx.n, device=ctx.device) if groups is None else groups
        rank = min(len(torch.unique(ids[_outside(test, ctx.n)])) for test in folds) - 1
        out = torch.empty((len(queries.scores), len(cands.scores)), dtype=torch.float64)
        for a, za in enumerate(queries.scores):
            for b, zb in enumerate(cands.scores):
                r = min(queries.widths[a], cands.widths[b], za.shape[1], zb.shape[1], rank)
                out[a, b] = self._precision(za[:, :r], zb[:, :r], folds, groups, opts) / ctx.n
        return out if opts["direction"] == "x_to_y" else out.T

    @staticmethod
    def _precision(q, c, folds, groups, opts) -> float:
        hits = 0
        for test in folds:
            train = _outside(test, len(q))
            u, _, vh = torch.linalg.svd(q[train].T @ c[train])
            mapped = torch.nn.functional.normalize(q[test] @ (u @ vh), dim=1)
            sims = mapped @ torch.nn.functional.normalize(c[test], dim=1).T
            if opts["retrieval"] == "csls":
                sims = csls(sims, opts["csls_k"])
            rivals = sims > sims.diagonal()[:, None]
            if groups is not None:
                rivals &= groups[test][None, :] != groups[test][:, None]
            hits += int((rivals.sum(dim=1) < opts["k"]).sum())
        return hits

    def permute(self, sy: PcaSide, perm):
        return sy.permuted(perm)
