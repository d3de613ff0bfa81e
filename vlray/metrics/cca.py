"""Canonical-correlation metrics: SVCCA and PWCCA.

Both reduce each layer once to the left singular vectors of its centred activations (which
are an orthonormal basis of its span, so CCA needs no further whitening): the canonical
correlations of a pair are the singular values of ``Ux^T Uy``. The grid computes that for all
pairs as one product of the stacked bases, then one small SVD per pair. Computed in float64
(canonical correlations near 1 lose digits in float32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .base import Metric
from .inputs import Context, LayerInput, float_option


@dataclass(frozen=True)
class SvdSide:
    """Per layer: the kept left singular vectors ``u`` (n, r), singular values, right vectors."""

    labels: list[str]
    u: list[torch.Tensor]
    s: list[torch.Tensor]
    vh: list[torch.Tensor]

    def permuted(self, perm: torch.Tensor) -> SvdSide:
        return replace(self, u=[u[perm] for u in self.u])


def reduced_svd(
    x: torch.Tensor, keep_variance: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the centred ``x``, keeping the fewest directions holding ``keep_variance``.

    Directions with numerically zero singular values (rank deficiency, constant columns) are
    never kept.
    """
    xc = x - x.mean(dim=0, keepdim=True)
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    rank = int((s > s[0] * max(xc.shape) * torch.finfo(s.dtype).eps).sum())
    var = s[:rank] ** 2
    frac = torch.cumsum(var, 0) / var.sum()
    # 1e-12: with keep_variance=1 the last cumulative fraction may round just below 1.
    r = min(
        int(
            torch.searchsorted(
                frac, torch.tensor(keep_variance - 1e-12, dtype=frac.dtype, device=frac.device)
            )
        )
        + 1,
        rank,
    )
    return u[:, :r], s[:r], vh[:r]


class _CcaMetric(Metric):
    defaults = {"keep_variance": 0.99, "center": True, "l2": False, "clamp_quantile": None}

    def check(self, opts):
        float_option(self.name, opts, "keep_variance", 0.0, 1.0)

    def side_bytes(self, n: int, width: int, opts: Mapping[str, Any], itemsize: int) -> int:
        return 2 * n * width * 8  # the float64 copy and its SVD

    def side(self, layers: Sequence[LayerInput], opts: Mapping[str, Any], ctx: Context) -> SvdSide:
        parts = [
            reduced_svd(ctx.load(layer, opts, dtype=torch.float64), opts["keep_variance"])
            for layer in layers
        ]
        return SvdSide([layer.label for layer in layers], *map(list, zip(*parts, strict=True)))

    def pairs(self, sx: SvdSide, sy: SvdSide, opts, ctx):
        cross = torch.cat(sx.u, dim=1).T @ torch.cat(sy.u, dim=1)
        out = torch.empty((len(sx.u), len(sy.u)), dtype=torch.float64)
        row = 0
        for a, ua in enumerate(sx.u):
            col = 0
            for b, ub in enumerate(sy.u):
                block = cross[row : row + ua.shape[1], col : col + ub.shape[1]]
                out[a, b] = self.combine(block, sx, a, sy, b)
                col += ub.shape[1]
            row += ua.shape[1]
        return out

    def combine(self, block: torch.Tensor, sx: SvdSide, a: int, sy: SvdSide, b: int) -> float:
        raise NotImplementedError

    def permute(self, sy: SvdSide, perm: torch.Tensor) -> SvdSide:
        return sy.permuted(perm)


class Svcca(_CcaMetric):
    """SVCCA (Raghu, Gilmer, Yosinski & Sohl-Dickstein, NeurIPS 2017).

    SVD each centred layer, keep the top directions holding ``keep_variance`` of the variance,
    CCA between the two reduced spaces, and average the ``min(rx, ry)`` canonical correlations.
    CCA overfits when ``rx + ry`` approaches n: keep n well above the kept dimensions.

    Options: ``keep_variance=0.99``; preprocessing ``center=True`` (CCA centres anyway),
    ``l2=False``, ``clamp_quantile=None``.
    """

    name = "svcca"

    def combine(self, block, sx, a, sy, b):
        return float(torch.linalg.svdvals(block).clamp(max=1.0).mean())


class Pwcca(_CcaMetric):
    """Projection-weighted CCA (Morcos, Raghu & Bengio, NeurIPS 2018).

    The canonical correlations ``rho_i`` of the (SVD-reduced, as in SVCCA) pair are averaged
    with weights ``alpha_i = sum_j |<h_i, z_j>|``: how much of the layer's centred neurons
    ``z_j`` each canonical variate ``h_i`` accounts for, on the side with fewer kept
    directions (X on a tie), as in the reference implementation.

    Options: ``keep_variance=0.99`` (1.0 gives plain PWCCA on full-rank data); preprocessing
    ``center=True``, ``l2=False``, ``clamp_quantile=None``.
    """

    name = "pwcca"

    def combine(self, block, sx, a, sy, b):
        left, rho, right_h = torch.linalg.svd(block, full_matrices=False)
        if block.shape[0] <= block.shape[1]:
            # Variates h = Ux A, and Ux^T Zx = diag(s) Vh, so h^T Zx = A^T diag(s) Vh.
            proj = left.T @ (sx.s[a][:, None] * sx.vh[a])
        else:
            proj = right_h @ (sy.s[b][:, None] * sy.vh[b])
        weights = proj.abs().sum(dim=1)
        return float((weights * rho.clamp(max=1.0)).sum() / weights.sum())
