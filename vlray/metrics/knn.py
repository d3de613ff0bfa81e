"""Nearest-neighbour metrics: mutual k-NN and CKNNA (Huh et al. 2024).

Reference: M. Huh, B. Cheung, T. Wang, P. Isola, "The Platonic Representation Hypothesis",
ICML 2024 (code: github.com/minyoungg/platonic-rep, ``metrics.py``).

Memory. Neighbours are found in row blocks (similarity of ``block`` rows against all rows,
at most ``SIM_BLOCK_BYTES`` at once), so no ``n x n`` matrix is ever formed. A grid keeps only
each layer's neighbour table (``n * k`` int64 indices, plus ``n * k`` kernel values for
CKNNA). Peak device memory for a grid is therefore about

    one layer's input and its normalised copy (2 * n * d * 4 bytes for float32)
    + SIM_BLOCK_BYTES (256 MiB)
    + all neighbour tables ((Lx + Ly) * n * k * 8 bytes, 24 bytes for CKNNA)
    + the overlap count's workspace (about 150 bytes per key, at most OVERLAP_BLOCK_KEYS =
      4M keys at once: <= ~0.6 GB; query rows are processed in blocks).

For a 13 x 13 mutual_knn grid at n = 100,000, d = 768, k = 10 in float32 that is
0.6 + 0.27 + 0.21 + 0.6 GB, under 2 GB, independent of the number of layer pairs (the
inputs themselves stay in host memory when given as numpy arrays or CPU tensors).

Bootstrap resamples with repeated rows. A copy of an item is the item itself: it is never its
own neighbour. The copies of another item are interchangeable, ordered the same way in both
spaces, so where only some copies of a neighbour fit in the k-row list, the same copies count
in X and Y. Computationally: neighbours are found among the distinct items drawn, each
neighbour item fills as many of the k slots as it has copies (in rank order), and each query
item is weighted by how many times it was drawn. This is exactly mutual k-NN on the
resampled rows, without the zero distances and arbitrary tie-breaks that copies would cause.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .base import Metric
from .inputs import Context, LayerInput, MetricInputError, int_option

# Largest similarity block (rows x all rows) held at once by the neighbour search.
SIM_BLOCK_BYTES = 256 << 20
# Largest number of (query, neighbour, copy) keys counted at once in the overlap step.
OVERLAP_BLOCK_KEYS = 1 << 22


def nearest_neighbours(
    x: torch.Tensor, k: int, block_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows of largest inner product with each row of ``x``, the row itself excluded.

    Args:
        x: ``(m, d)`` tensor; rows l2-normalised for cosine neighbours.
        k: neighbours per row, ``k < m``.
        block_rows: rows per similarity block (default: as many as fit ``SIM_BLOCK_BYTES``).

    Returns:
        ``(idx, sims)``, both ``(m, k)``, sorted by decreasing similarity.
    """
    m = x.shape[0]
    if block_rows is None:
        block_rows = max(1, min(m, SIM_BLOCK_BYTES // (m * x.element_size())))
    idx = torch.empty((m, k), dtype=torch.long, device=x.device)
    sims = torch.empty((m, k), dtype=x.dtype, device=x.device)
    for start in range(0, m, block_rows):
        stop = min(start + block_rows, m)
        s = x[start:stop] @ x.T
        local = torch.arange(stop - start, device=x.device)
        s[local, local + start] = -torch.inf
        sims[start:stop], idx[start:stop] = torch.topk(s, k, dim=1, sorted=True)
    return idx, sims


def slot_counts(idx: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """How many of the k neighbour slots each listed neighbour item fills (its copies, in order).

    With every weight 1 this is all ones. With bootstrap multiplicities, the first neighbours'
    copies fill the list until it holds k rows.
    """
    w = weights[idx]
    before = torch.cumsum(w, dim=1) - w
    return torch.minimum((k - before).clamp(min=0), w)


@dataclass(frozen=True)
class KnnSide:
    """Per-layer neighbour tables of one side of the grid (positions among the items)."""

    labels: list[str]
    idx: list[torch.Tensor]  # (m, k) neighbour item positions, nearest first
    counts: list[torch.Tensor]  # (m, k) slots each neighbour fills (float64)
    sims: list[torch.Tensor]  # (m, k) kernel values at the neighbours (float64)
    weights: torch.Tensor  # (m,) times each item was drawn (all ones without resampling)
    self_hsic: list[float]  # CKNNA only: each layer's masked self-HSIC

    def permuted(self, perm: torch.Tensor) -> KnnSide:
        inverse = torch.argsort(perm)
        return replace(
            self,
            idx=[inverse[i[perm]] for i in self.idx],
            counts=[c[perm] for c in self.counts],
            sims=[s[perm] for s in self.sims],
        )


def _slot_keys(
    idx: torch.Tensor, counts: torch.Tensor, start: int, m: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of the (query, neighbour item, copy) slots of query rows ``start..``, and queries."""
    q = torch.arange(start, start + idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
    base = (q * m + idx) * k
    keys, queries = [], []
    for t in range(int(counts.max())):
        sel = counts > t
        keys.append(base[sel] + t)
        queries.append(q[sel])
    return torch.cat(keys), torch.cat(queries)


def mutual_knn_grid(sx: KnnSide, sy: KnnSide, k: int) -> torch.Tensor:
    """Mean shared-neighbour fraction for every (x layer, y layer) pair, in one product.

    Each layer's neighbour slots become keys; ``V[key, layer]`` marks which layers hold a
    slot, so ``Vx.T @ Vy`` counts the shared slots of all pairs at once. Query rows are
    processed in blocks to bound memory.
    """
    m = sx.idx[0].shape[0]
    device = sx.idx[0].device
    lx, ly = len(sx.idx), len(sy.idx)
    w = sx.weights
    # float32 counts are exact below 2**24; the block bounds every partial sum below that.
    block = max(1, min(m, OVERLAP_BLOCK_KEYS // ((lx + ly) * k), (1 << 24) // (k * int(w.max()))))
    total = torch.zeros((lx, ly), dtype=torch.float64, device=device)
    for start in range(0, m, block):
        stop = min(start + block, m)
        parts = [
            _slot_keys(i[start:stop], c[start:stop], start, m, k)
            for i, c in zip(sx.idx, sx.counts, strict=True)
        ]
        parts += [
            _slot_keys(i[start:stop], c[start:stop], start, m, k)
            for i, c in zip(sy.idx, sy.counts, strict=True)
        ]
        keys = torch.cat([p[0] for p in parts])
        layer = torch.cat(
            [torch.full_like(p[0], i if i < lx else i - lx) for i, p in enumerate(parts)]
        )
        n_x = sum(len(p[0]) for p in parts[:lx])
        _, inverse = torch.unique(keys, return_inverse=True)
        n_keys = int(inverse.max()) + 1
        vx = torch.zeros((n_keys, lx), dtype=torch.float32, device=device)
        vx[inverse[:n_x], layer[:n_x]] = 1.0
        vy = torch.zeros((n_keys, ly), dtype=torch.float32, device=device)
        queries_y = torch.cat([p[1] for p in parts[lx:]])
        vy[inverse[n_x:], layer[n_x:]] = w[queries_y].to(torch.float32)
        total += (vx.T @ vy).to(torch.float64)
    return total / (k * w.sum())


def masked_hsic(
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
) -> float:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of two kernels masked to shared neighbours.

    ``a`` and ``b`` are one layer's ``(idx, counts, sims)`` tables. The masked kernel
    ``P = M_a * M_b * K_a`` is never formed: the three HSIC terms
    ``sum(P * Q.T)``, ``sum(P) sum(Q)`` and ``sum(P @ Q)`` are sums over the O(n k) shared
    neighbour slots. With bootstrap ``weights`` (multiplicities) this equals the HSIC of the
    expanded rows, where a slot shared by both layers counts min(copies in a, copies in b).
    """
    ia, ca, ka = a
    ib, cb, kb = b
    m, k = ia.shape
    match = ia.unsqueeze(2) == ib.unsqueeze(1)  # (m, k, k): a's slot j is b's slot l
    shared = match.any(dim=2)
    # Neighbour lists hold distinct items: at most one match, so the sum is its position.
    pos_b = (match * torch.arange(k, device=ia.device)).sum(dim=2)
    c = torch.where(shared, torch.minimum(ca, cb.gather(1, pos_b)), 0.0)
    kb_at_a = torch.where(shared, kb.gather(1, pos_b), 0.0)
    w = weights
    row_p = (c * ka).sum(dim=1)
    row_q = (c * kb_at_a).sum(dim=1)
    sum_p, sum_q = (w * row_p).sum(), (w * row_q).sum()
    col_p = torch.zeros(m, dtype=ka.dtype, device=ka.device)
    col_p.index_add_(0, ia.reshape(-1), (w.unsqueeze(1) * c * ka).reshape(-1))
    sum_pq = (col_p * row_q).sum()
    # sum(P * Q.T) needs slot (j, i) for each shared slot (i, j): look it up by key.
    sel = c > 0
    qi = torch.arange(m, device=ia.device).unsqueeze(1).expand_as(ia)[sel]
    qj = ia[sel]
    cs = c[sel]
    trace = torch.zeros((), dtype=ka.dtype, device=ka.device)
    if len(cs):
        keys, order = torch.sort(qi * m + qj)
        tkeys = qj * m + qi
        pos = torch.searchsorted(keys, tkeys).clamp(max=len(keys) - 1)
        c_t = torch.where(keys[pos] == tkeys, cs[order][pos], 0.0)
        trace = (cs * c_t * ka[sel] * kb_at_a[sel]).sum()
    n = w.sum()
    hsic = (trace + sum_p * sum_q / ((n - 1) * (n - 2)) - 2 * sum_pq / (n - 2)) / (n * (n - 3))
    return float(hsic)


class _KnnMetric(Metric):
    cosine = True  # rank by cosine similarity (mutual_knn), else by the linear kernel (cknna)

    def check(self, opts: dict) -> None:
        int_option(self.name, opts, "k", 1)

    def min_rows(self, opts: Mapping[str, Any]) -> tuple[int, str]:
        return opts["k"] + 1, f"k={opts['k']} neighbours besides the item itself"

    def side_bytes(self, n: int, width: int, opts: Mapping[str, Any], itemsize: int) -> int:
        # the copy, three n x k tables, and the neighbour search's row block of similarities
        return n * width * itemsize + n * opts["k"] * 24

    def side(self, layers: Sequence[LayerInput], opts: Mapping[str, Any], ctx: Context) -> KnnSide:
        k = opts["k"]
        _, weights = ctx.items()
        if len(weights) < k + 1:
            raise MetricInputError(
                f"{layers[0].label}: the bootstrap resample has only {len(weights)} distinct "
                f"items; {self.name} with k={k} needs at least {k + 1}"
            )
        idx, counts, sims, self_hsic = [], [], [], []
        for layer in layers:
            x = ctx.load(layer, opts, unit_rows=self.cosine, distinct=True)
            block_rows = max(1, ctx.scratch(SIM_BLOCK_BYTES) // (x.shape[0] * x.element_size()))
            i, s = nearest_neighbours(x, k, block_rows)
            del x
            idx.append(i)
            counts.append(slot_counts(i, weights, k))
            sims.append(s.to(torch.float64))
            self_hsic.append(self._self_hsic(layer.label, idx[-1], counts[-1], sims[-1], weights))
        return KnnSide([layer.label for layer in layers], idx, counts, sims, weights, self_hsic)

    def _self_hsic(self, label, idx, counts, sims, weights) -> float:
        return float("nan")

    def permute(self, sy: KnnSide, perm: torch.Tensor) -> KnnSide:
        return sy.permuted(perm)


class MutualKnn(_KnnMetric):
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024).

    For each item, the fraction of its ``k`` nearest neighbours under cosine similarity (the
    item itself excluded) that are the same items in both spaces, averaged over items.
    1 means identical neighbourhoods; independent spaces score about ``k / (n - 1)``.

    Options: ``k=10``; preprocessing ``center=False``, ``l2=True``, ``clamp_quantile=None``
    (``l2`` does not change cosine neighbours; ``center=True`` does).
    """

    name = "mutual_knn"
    defaults = {"k": 10, "center": False, "l2": True, "clamp_quantile": None}

    def pairs(self, sx: KnnSide, sy: KnnSide, opts: Mapping[str, Any], ctx: Context):
        return mutual_knn_grid(sx, sy, opts["k"])


class Cknna(_KnnMetric):
    """CKNNA: CKA restricted to mutual nearest neighbours (Huh et al. 2024, ``cknna``).

    With the linear kernel ``K = X X^T`` and ``M_X`` the k-NN mask by ``K`` (self excluded),
    ``cknna = H(M_X M_Y K, M_X M_Y L) / sqrt(H(M_X K, M_X K) H(M_Y L, M_Y L))`` where ``H`` is
    the unbiased HSIC (Song et al. 2012) and products are elementwise. Unlike the reference
    code, no 1e-6 is added to the denominator (it is a sizeable bias at large n); a
    non-positive self term raises MetricInputError instead.

    Options: ``k=10``; preprocessing ``center=False``, ``l2=True`` (the kernel is then cosine
    similarity, as in the reference), ``clamp_quantile=None``.
    Memory is O(n k) per layer; each pair costs O(n k^2), pairs are looped.
    """

    name = "cknna"
    defaults = {"k": 10, "center": False, "l2": True, "clamp_quantile": None}
    cosine = False

    def check(self, opts: dict) -> None:
        # With k=1 the unbiased HSIC of a one-neighbour mask is degenerate, as in the reference.
        int_option(self.name, opts, "k", 2)

    def min_rows(self, opts: Mapping[str, Any]) -> tuple[int, str]:
        return max(opts["k"] + 1, 4), f"k={opts['k']} neighbours and the unbiased HSIC"

    def _self_hsic(self, label, idx, counts, sims, weights) -> float:
        h = masked_hsic((idx, counts, sims), (idx, counts, sims), weights)
        if not h > 0:
            raise MetricInputError(
                f"{label}: cknna is undefined: the kernel restricted to its own nearest "
                f"neighbours has non-positive unbiased HSIC ({h:.3g})"
            )
        return h

    def pairs(self, sx: KnnSide, sy: KnnSide, opts: Mapping[str, Any], ctx: Context):
        out = torch.empty((len(sx.idx), len(sy.idx)), dtype=torch.float64)
        for a in range(len(sx.idx)):
            ta = (sx.idx[a], sx.counts[a], sx.sims[a])
            for b in range(len(sy.idx)):
                tb = (sy.idx[b], sy.counts[b], sy.sims[b])
                hsic = masked_hsic(ta, tb, sx.weights)
                out[a, b] = hsic / (sx.self_hsic[a] * sy.self_hsic[b]) ** 0.5
        return out
