"""Kernel and dissimilarity-matrix metrics: CKA (linear, unbiased, RBF) and RSA.

Each of these is an inner product of per-layer ``n x n`` matrices after a per-layer
normalisation (centred Gram over its Frobenius norm, U-centred Gram, rank vector of the
dissimilarities). A layer is therefore reduced once to a unit vector over the upper triangle
(off-diagonal entries scaled by sqrt(2) so that vector dot products equal Frobenius products),
and a whole grid is one ``(Lx, P) @ (P, Ly)`` matrix product.

Memory. The Gram-type path holds ``(Lx + Ly) * n (n + 1) / 2`` values plus a few ``n x n``
working matrices: 17 MB per layer at n = 2048 in float64, 20 GB per layer at n = 100,000.
Linear CKA therefore also has a feature-space path, ``||Yc^T Xc||_F^2``, streamed over row
blocks: memory O(Dx * Dy) for the cross-covariance of the stacked layers (``D`` = summed
widths; 13 layers of 768 -> 10k x 10k, 400 MB in float32) plus one row block, never
O(n^2). ``method="auto"`` picks whichever needs fewer operations within the memory budget.
unbiased_cka, cka_rbf and rsa are O(n^2) by nature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .base import Metric
from .inputs import (
    Context,
    LayerInput,
    MetricInputError,
    Preprocessor,
    choice_option,
    float_option,
)

# Largest stack of per-layer Gram vectors the "auto" CKA path will hold.
GRAM_BUDGET_BYTES = 2 << 30
# Largest float64 slice of the Gram stacks converted at once for the pair products.
GRAM_CHUNK_BYTES = 64 << 20
# Largest row block (all layers side by side) streamed by the feature-space CKA path.
FEATURE_BLOCK_BYTES = 256 << 20


# ---------------------------------------------------------------------------------------------
# Upper-triangle vectors


def triu_position(a: torch.Tensor, b: torch.Tensor, n: int, offset: int) -> torch.Tensor:
    """Position of entry (a, b), a <= b, in the row-major upper triangle with ``offset``."""
    return a * n - a * (a - 1) // 2 + (b - a) - offset * (a + 1)


def permuted_positions(perm: torch.Tensor, offset: int) -> torch.Tensor:
    """Where each upper-triangle entry of ``M[perm][:, perm]`` sits in the triangle of ``M``."""
    n = len(perm)
    rows, cols = torch.triu_indices(n, n, offset, device=perm.device)
    a, b = perm[rows], perm[cols]
    return triu_position(torch.minimum(a, b), torch.maximum(a, b), n, offset)


def triu_values(g: torch.Tensor, offset: int) -> torch.Tensor:
    """Row-major upper triangle of ``g`` (``offset=1``: without the diagonal)."""
    n = g.shape[0]
    rows, cols = torch.triu_indices(n, n, offset, device=g.device)
    return g[rows, cols]


def triu_vector(g: torch.Tensor, offset: int) -> torch.Tensor:
    """Upper triangle of a symmetric ``g``, off-diagonal entries times sqrt(2).

    Then ``triu_vector(A) @ triu_vector(B) == (A * B).sum()`` (with a zero diagonal when
    ``offset=1``).
    """
    v = triu_values(g, offset) * math.sqrt(2.0)
    if offset == 0:
        n = g.shape[0]
        # Diagonal entries open each row: positions 0, n, 2n - 1, ... (triu_position(a, a)).
        a = torch.arange(n, device=g.device)
        v[triu_position(a, a, n, 0)] /= math.sqrt(2.0)
    return v


def _unit(v: torch.Tensor, label: str, metric: str, what: str) -> torch.Tensor:
    # float64 accumulation: a float32 sum over millions of entries loses ~1e-5.
    norm = torch.linalg.vector_norm(v, dtype=torch.float64).to(v.dtype)
    if not bool(norm > 0) or not bool(torch.isfinite(norm)):
        raise MetricInputError(
            f"{label}: {what} is zero after preprocessing; {metric} is undefined"
        )
    return v / norm


def rankdata(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata``)."""
    sorted_v, order = torch.sort(v)
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(v.dtype)
    average = ends - (counts.to(v.dtype) - 1) / 2
    ranks = torch.empty_like(v)
    ranks[order] = average[inverse]
    return ranks


def median(v: torch.Tensor) -> torch.Tensor:
    """Median, averaging the two middle values for an even count (as numpy)."""
    m = len(v)
    lo = torch.kthvalue(v, (m - 1) // 2 + 1).values
    hi = torch.kthvalue(v, m // 2 + 1).values
    return (lo + hi) / 2


def _pair_mask(n: int, offset: int, ctx: Context) -> torch.Tensor | None:
    """Positions of the upper-triangle entries to keep under a bootstrap resample: every pair
    of distinct items, and the diagonal where the vector has one; None when every row is its
    own item.

    A pair of two copies of one item compares the item with itself. Counted as a pair it
    inflates every similarity-based score (the biased HSIC most: a CKA bootstrap without this
    sits above its own point estimate at a few hundred items), so resamples leave it out.
    """
    if ctx.rows is None:
        return None
    # Every layer of a resample has the same mask: build it once per (resample, n, offset).
    key = (n, offset, str(ctx.device))
    cached = _MASKS.get(key)
    if cached is not None and cached[0] is ctx.rows:
        return cached[1]
    groups = ctx.groups()
    rows, cols = torch.triu_indices(n, n, offset, device=groups.device)
    keep = torch.nonzero((groups[rows] != groups[cols]) | (rows == cols)).squeeze(1)
    _MASKS.clear()
    _MASKS[key] = (ctx.rows, keep)
    return keep


_MASKS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _without_copy_pairs(v: torch.Tensor, n: int, offset: int, ctx: Context) -> torch.Tensor:
    keep = _pair_mask(n, offset, ctx)
    return v if keep is None else v[keep.to(v.device)]


@dataclass(frozen=True)
class GramSide:
    """Per-layer unit vectors over the upper triangle, stacked ``(L, P)``."""

    labels: list[str]
    vectors: torch.Tensor
    offset: int
    n: int

    def permuted(self, perm: torch.Tensor) -> GramSide:
        return replace(self, vectors=self.vectors[:, permuted_positions(perm, self.offset)])


def gram_products(
    vx: torch.Tensor, vy: torch.Tensor, chunk_bytes: int | None = None
) -> torch.Tensor:
    """``vx @ vy.T`` accumulated in float64, in column chunks.

    The products are long (n(n+1)/2 terms) but cheap next to building the Gram matrices, so
    float64 costs little and keeps float32 grids within ~1e-6 of float64 ones.
    """
    if vx.dtype == torch.float64:
        return vx @ vy.T
    out = torch.zeros((len(vx), len(vy)), dtype=torch.float64, device=vx.device)
    step = max(1, (chunk_bytes or GRAM_CHUNK_BYTES) // ((len(vx) + len(vy)) * 8))
    for start in range(0, vx.shape[1], step):
        stop = start + step
        out += vx[:, start:stop].double() @ vy[:, start:stop].double().T
    return out


class _GramMetric(Metric):
    offset = 0  # 1: the diagonal is not part of the vector
    unit_rows = False

    def layer_vector(
        self, x: torch.Tensor, label: str, opts: Mapping[str, Any], ctx: Context
    ) -> torch.Tensor:
        raise NotImplementedError

    def side_bytes(self, n: int, width: int, opts: Mapping[str, Any], itemsize: int) -> int:
        # the layer's copy, its n x n Gram matrix while built, and the kept triangle
        return (n * width + n * n + n * (n + 1) // 2) * itemsize

    def side(self, layers: Sequence[LayerInput], opts: Mapping[str, Any], ctx: Context) -> GramSide:
        vectors = None
        for i, layer in enumerate(layers):
            x = ctx.load(layer, opts, unit_rows=self.unit_rows)
            v = self.layer_vector(x, layer.label, opts, ctx)
            if vectors is None:  # allocated once: the stack is the big object here
                vectors = torch.empty((len(layers), len(v)), dtype=v.dtype, device=v.device)
            vectors[i] = v
        return GramSide([layer.label for layer in layers], vectors, self.offset, ctx.n)

    def pairs(self, sx: GramSide, sy: GramSide, opts: Mapping[str, Any], ctx: Context):
        return gram_products(sx.vectors, sy.vectors, ctx.scratch(GRAM_CHUNK_BYTES))

    def permute(self, sy: GramSide, perm: torch.Tensor) -> GramSide:
        return sy.permuted(perm)


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(dim=0, keepdim=True)
    return xc @ xc.T


# ---------------------------------------------------------------------------------------------
# Linear CKA


@dataclass(frozen=True)
class FeatureSide:
    """Feature-space CKA: fitted preprocessing per layer, streamed in row blocks on demand."""

    labels: list[str]
    layers: list[LayerInput]
    preps: list[Preprocessor]
    means: list[torch.Tensor]  # column means after preprocessing (HSIC centring)
    self_norms: torch.Tensor  # ||Xc^T Xc||_F per layer
    rows: torch.Tensor | None  # rows of the sample (bootstrap, permutation), None: all

    def block(self, start: int, stop: int, ctx: Context) -> torch.Tensor:
        out = []
        for layer, prep, mean in zip(self.layers, self.preps, self.means, strict=True):
            x = layer.data
            x = x[start:stop] if self.rows is None else x[self.rows[start:stop].to(x.device)]
            out.append(prep.apply(x.to(device=ctx.device, dtype=ctx.dtype)) - mean)
        return torch.cat(out, dim=1)

    def permuted(self, perm: torch.Tensor) -> FeatureSide:
        rows = perm if self.rows is None else self.rows[perm.to(self.rows.device)]
        return replace(self, rows=rows)


class Cka(_GramMetric):
    """Linear CKA with the biased HSIC (Kornblith, Norouzi, Lee & Hinton, ICML 2019).

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``, equivalently the cosine between
    the centred Gram matrices. Invariant to orthogonal transforms and isotropic scaling of
    either side. Centring is part of the definition, so ``center`` only matters with ``l2``.

    Options: ``method="auto"`` (``"gram"``: n x n Gram vectors, one product for the grid;
    ``"features"``: d x d cross-covariances streamed over row blocks, O(D^2) memory, for
    large n); preprocessing ``center=True``, ``l2=False``, ``clamp_quantile=None``. Under a
    bootstrap resample the Gram path leaves out pairs of two copies of one item; the feature
    path cannot (its bias from copies shrinks as 1/n, and it is chosen only for large n).
    """

    name = "cka"
    defaults = {"method": "auto", "center": True, "l2": False, "clamp_quantile": None}

    def check(self, opts: dict) -> None:
        choice_option(self.name, opts, "method", ("auto", "gram", "features"))

    def plan(self, widths_x, widths_y, opts: dict, ctx: Context) -> dict:
        if opts["method"] != "auto":
            return opts
        n = ctx.n
        widths = list(widths_x) + list(widths_y)
        gram_ops = n * n * sum(widths) + len(widths_x) * len(widths_y) * n * n / 2
        feature_ops = n * sum(widths_x) * sum(widths_y) + n * sum(d * d for d in widths)
        gram_bytes = len(widths) * n * (n + 1) / 2 * ctx.dtype.itemsize
        use_gram = gram_ops <= feature_ops and gram_bytes <= GRAM_BUDGET_BYTES
        return {**opts, "method": "gram" if use_gram else "features"}

    def layer_vector(self, x, label, opts, ctx):
        v = _without_copy_pairs(triu_vector(centred_gram(x), 0), x.shape[0], 0, ctx)
        return _unit(v, label, self.name, "the centred Gram matrix")

    def side_bytes(self, n: int, width: int, opts: Mapping[str, Any], itemsize: int) -> int:
        if opts["method"] == "gram":
            return super().side_bytes(n, width, opts, itemsize)
        return n * width * itemsize + width * width * 8  # the copy and its covariance

    def side(self, layers, opts, ctx):
        if opts["method"] == "gram":
            return super().side(layers, opts, ctx)
        preps, means, norms = [], [], []
        for layer in layers:
            x, prep = ctx.fit(layer, opts)
            mean = x.mean(dim=0, keepdim=True)
            x = x - mean
            norm = torch.linalg.matrix_norm((x.T @ x).double())
            del x
            if not bool(norm > 0):
                raise MetricInputError(
                    f"{layer.label}: zero variance after preprocessing; cka is undefined"
                )
            preps.append(prep)
            means.append(mean)
            norms.append(norm)
        labels = [layer.label for layer in layers]
        return FeatureSide(labels, list(layers), preps, means, torch.stack(norms), ctx.rows)

    def pairs(self, sx, sy, opts, ctx):
        if isinstance(sx, GramSide):
            return super().pairs(sx, sy, opts, ctx)
        wx = torch.tensor([layer.width for layer in sx.layers], device=ctx.device)
        wy = torch.tensor([layer.width for layer in sy.layers], device=ctx.device)
        cross = torch.zeros((int(wx.sum()), int(wy.sum())), dtype=ctx.dtype, device=ctx.device)
        block = ctx.scratch(FEATURE_BLOCK_BYTES) // (int(wx.sum() + wy.sum()) * ctx.dtype.itemsize)
        block = max(1, min(ctx.n, block))
        for start in range(0, ctx.n, block):
            stop = min(start + block, ctx.n)
            cross.addmm_(sx.block(start, stop, ctx).T, sy.block(start, stop, ctx))
        # ||Yb^T Xa||_F^2 for every layer pair: sum the squared cross-covariance by blocks,
        # one x layer's rows at a time, in float64 (sums of ~d^2 terms).
        col_layer = torch.repeat_interleave(torch.arange(len(wy), device=ctx.device), wy)
        hsic = torch.zeros((len(wx), len(wy)), dtype=torch.float64, device=ctx.device)
        for a, rows in enumerate(torch.split(cross, wx.tolist(), dim=0)):
            hsic[a].index_add_(0, col_layer, rows.double().square().sum(dim=0))
        return hsic / (sx.self_norms[:, None] * sy.self_norms[None, :])

    def permute(self, sy, perm):
        return sy.permuted(perm)


class UnbiasedCka(_GramMetric):
    """Linear CKA with the unbiased HSIC estimator (Song, Smola, Gretton et al., JMLR 2012).

    ``HSIC_u(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``
    with ``K~`` the Gram matrix with zeroed diagonal. It equals ``<U(K), U(L)> / (n(n-3))``
    with ``U`` the U-centring of Szekely & Rizzo (Ann. Statist. 2014), which is what is
    batched: each layer becomes its unit U-centred Gram vector. Needs n >= 4. Under a bootstrap
    resample, pairs of two copies of one item are left out (see ``_pair_mask``).

    Options: preprocessing ``center=True`` (no effect on the estimator), ``l2=False``,
    ``clamp_quantile=None``.
    """

    name = "unbiased_cka"
    defaults = {"center": True, "l2": False, "clamp_quantile": None}
    offset = 1

    def min_rows(self, opts):
        return 4, "the unbiased HSIC estimator divides by n - 3"

    def layer_vector(self, x, label, opts, ctx):
        n = x.shape[0]
        k = x @ x.T
        k.fill_diagonal_(0)
        r = k.sum(dim=1)
        u = k - r[:, None] / (n - 2) - r[None, :] / (n - 2) + r.sum() / ((n - 1) * (n - 2))
        v = _without_copy_pairs(triu_vector(u, 1), n, 1, ctx)
        return _unit(v, label, self.name, "the U-centred Gram matrix")


class CkaRbf(_GramMetric):
    """CKA with an RBF kernel and the biased HSIC (Kornblith et al., ICML 2019).

    ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` with ``sigma = bandwidth * median`` of the
    pairwise distances (over distinct pairs; pairs of bootstrap copies left out).

    Options: ``bandwidth=1.0``; preprocessing ``center=True`` (no effect: the kernel is
    translation invariant), ``l2=False``, ``clamp_quantile=None``.
    """

    name = "cka_rbf"
    defaults = {"bandwidth": 1.0, "center": True, "l2": False, "clamp_quantile": None}

    def check(self, opts):
        float_option(self.name, opts, "bandwidth", 0.0, math.inf)

    def layer_vector(self, x, label, opts, ctx):
        n = x.shape[0]
        g = x @ x.T
        sq = (g.diagonal()[:, None] + g.diagonal()[None, :] - 2 * g).clamp_(min=0)
        sq.fill_diagonal_(0)
        del g
        dist = triu_values(sq, 1).sqrt_()
        keep = _pair_mask(n, 1, ctx)
        mid = median(dist if keep is None else dist[keep])
        del dist
        if not bool(mid > 0):
            raise MetricInputError(
                f"{label}: the median pairwise distance is 0 (most rows identical); "
                "cka_rbf's bandwidth is undefined"
            )
        sigma = opts["bandwidth"] * mid
        k = torch.exp_(sq.div_(-2 * sigma * sigma))
        k = k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()
        v = _without_copy_pairs(triu_vector(k, 0), n, 0, ctx)
        return _unit(v, label, self.name, "the centred RBF kernel")


class Rsa(_GramMetric):
    """Representational similarity analysis (Kriegeskorte, Mur & Bandettini, 2008).

    Spearman correlation between the upper triangles of the two ``1 - cosine similarity``
    dissimilarity matrices (ties get average ranks, as scipy.stats.spearmanr). Each layer
    becomes its centred, unit-norm rank vector, so the grid is one product. Under bootstrap,
    pairs of two copies of one item are left out (their zero dissimilarity would agree
    trivially in both spaces).

    Options: preprocessing ``center=False``, ``l2=False`` (no effect: cosine),
    ``clamp_quantile=None``.
    """

    name = "rsa"
    defaults = {"center": False, "l2": False, "clamp_quantile": None}
    offset = 1
    unit_rows = True

    def layer_vector(self, x, label, opts, ctx):
        n = x.shape[0]
        d = triu_values(1.0 - x @ x.T, 1)
        keep = _pair_mask(n, 1, ctx)
        if keep is not None:
            d = d[keep]
        r = rankdata(d)
        return _unit(r - r.mean(), label, self.name, "the variance of the dissimilarities")

    def permute(self, sy, perm):
        return sy.permuted(perm)
