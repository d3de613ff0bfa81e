"""Representational alignment metrics over whole layer grids.

``score(X, Y, metric)`` compares two paired ``(n_items, dim)`` arrays (row i of X and row i
of Y describe the same item); ``grid(Xs, Ys, metric)`` compares every layer of one model
with every layer of another, processing each layer once and all pairs together;
``grid_stats`` adds bootstrap intervals and a permutation null (``bootstrap_replicates`` gives
the resampled grids themselves, for intervals of differences); ``RidgeMap`` and
``ProcrustesMap`` fit linear maps between two spaces for the forced-choice and retrieval
studies.

Metrics (:data:`METRICS`), their options and defaults (details in each class's docstring):

==============================  ===============================================  ===========
metric (reference)              options (defaults)                               center, l2
==============================  ===============================================  ===========
mutual_knn (Huh+ 2024)          k=10                                             False, True
cka (Kornblith+ 2019)           method="auto" | "gram" | "features"              True, False
unbiased_cka (Song+ 2012)       -                                                True, False
cka_rbf (Kornblith+ 2019)       bandwidth=1.0 (sigma = bandwidth * median dist)  True, False
cknna (Huh+ 2024)               k=10                                             False, True
rsa (Kriegeskorte+ 2008)        -                                                False, False
svcca (Raghu+ 2017)             keep_variance=0.99                               True, False
pwcca (Morcos+ 2018)            keep_variance=0.99                               True, False
linear_predictivity             direction="x_to_y", alphas=1e-3..1e6 (10),       True, False
(Yamins+ 2014)                  folds=5, fold_seed=0
procrustes_retrieval            k=1, retrieval="nn" | "csls", csls_k=10,         True, True
(Li+ 2024)                      direction="x_to_y", folds=5, fold_seed=0
==============================  ===============================================  ===========

Every metric also takes ``clamp_quantile`` (default None): clamp each feature to its
``1 - q`` and ``q`` quantiles (e.g. 0.99) before centring (``center``) and row
l2-normalisation (``l2``), in that order. A constant column among others is fine (it
carries no signal; correlation-based metrics skip it); a layer whose rows are all identical
is an error, as are NaN/inf values, rows of zero norm where cosine similarity is needed, and
fewer rows than the metric needs. Errors are :class:`MetricInputError` naming the layer.

Fewest items: ``min_items(metric, bootstrap=B, **options)`` (without bootstrap: k + 1 for
mutual_knn and cknna, 4 for unbiased_cka, 2 per fold for the predictive metrics, 3 for the
others; a bootstrap resample holds only about 63% of the items distinct, so with B resamples
the minimum is the smallest n at which any resample falls short with under 1% chance: 26 for
mutual_knn's k=10 at B=100). ``fit_options(metric, n, bootstrap=B)`` gives the largest k or
folds that fit n items; the studies skip a metric that does not fit, saying what to change.

Batching: mutual_knn, cka, unbiased_cka, cka_rbf and rsa compute each layer's neighbour
table or normalised Gram vector once and score all pairs with one matrix product; cknna,
svcca, pwcca, linear_predictivity and procrustes_retrieval loop over pairs but reuse each
layer's neighbour table, SVD or PCA. Memory: see :mod:`vlray.metrics.knn` (mutual_knn is
O(n k) per layer plus a 256 MiB similarity block: a 13 x 13 grid at n = 100,000, d = 768 needs
under 2 GB of device memory) and :mod:`vlray.metrics.kernels` (feature-space CKA is
O(D^2) for summed width D; the other kernel metrics are O(n^2) per layer).
"""

from .engine import METRICS, grid, metric_options, score
from .inputs import MetricInputError
from .maps import MAPS, PcaBasis, ProcrustesMap, RidgeMap, cosine
from .stats import (
    GridStats,
    bootstrap_replicates,
    fit_options,
    grid_stats,
    min_items,
    score_stats,
)

__all__ = [
    "METRICS",
    "GridStats",
    "MAPS",
    "PcaBasis",
    "ProcrustesMap",
    "RidgeMap",
    "bootstrap_replicates",
    "cosine",
    "fit_options",
    "MetricInputError",
    "grid",
    "grid_stats",
    "metric_options",
    "min_items",
    "score",
    "score_stats",
]
