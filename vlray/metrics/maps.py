"""Linear maps between two embedding spaces, fitted on paired rows and applied to new ones.

The forced-choice and concept-retrieval studies fit a map from one model's space into
another's on training items and compare mapped queries with candidates there. Both maps work
on l2-normalised rows centred on the training mean (the field's preprocessing), fit one source
layer against several target layers at once (the source is decomposed once), and expose the
comparison space through ``queries`` (mapped sources) and ``candidates`` (targets brought into
the same space). Computed in float64 with torch, on the GPU when present.

- :class:`RidgeMap`: ridge regression with an unpenalised intercept, the penalty chosen per
  target layer over ``alphas`` by generalised cross-validation (a few operations per penalty,
  so a whole layer grid of maps stays cheap).
- :class:`ProcrustesMap`: both sides PCA-reduced to the smaller width (and to fewer axes than
  training rows), then the orthogonal map that best rotates source onto target (Schonemann
  1966; Li et al., TACL 2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike

from .inputs import MetricInputError, resolve_device
from .predictive import DEFAULT_ALPHAS


def _rows(a: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    """A finite 2-D float64 tensor with l2-normalised rows; errors name ``name``."""
    x = torch.as_tensor(np.asarray(a, dtype=np.float64), device=device)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise MetricInputError(
            f"{name}: expected a non-empty 2-D array, got shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise MetricInputError(f"{name}: contains NaN or infinite values")
    norms = x.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise MetricInputError(f"{name}: row {int((norms == 0).nonzero()[0, 0])} is all zeros")
    return x / norms


def _paired(x: torch.Tensor, ys: Sequence[torch.Tensor], minimum: int) -> None:
    for j, y in enumerate(ys):
        if len(y) != len(x):
            raise MetricInputError(f"target {j}: {len(y)} rows, but the source has {len(x)}")
    if len(x) < minimum:
        raise MetricInputError(f"a map needs at least {minimum} training rows, got {len(x)}")


class RidgeMap:
    """Ridge regression from one source space to each of several target spaces, the penalty
    chosen per target by generalised cross-validation.

    ``fit(X, [Y1, Y2, ...])`` on paired training rows; ``queries(X_new)[j]`` are the
    predictions for target j and ``candidates(j, Y)`` the target rows, both centred on target
    j's training mean, so cosine similarity between them is the comparison.
    """

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, device: str | None = None):
        if not alphas or any(a <= 0 for a in alphas):
            raise MetricInputError(f"alphas must be positive numbers, got {list(alphas)!r}")
        self.alphas = tuple(float(a) for a in alphas)
        self.device = resolve_device(device)

    def fit(self, x: ArrayLike, ys: Sequence[ArrayLike]) -> RidgeMap:
        x = _rows(x, "source", self.device)
        ys = [_rows(y, f"target {j}", self.device) for j, y in enumerate(ys)]
        _paired(x, ys, 3)
        self.x_mean = x.mean(dim=0)
        u, s, vh = torch.linalg.svd(x - self.x_mean, full_matrices=False)
        s2, n = s * s, len(x)
        self.y_means, self.coefs, self.chosen_alphas = [], [], []
        for y in ys:
            y_mean = y.mean(dim=0)
            yc = y - y_mean
            uty = u.T @ yc
            # Generalised cross-validation (Golub, Heath & Wahba 1979), O(rank) per penalty:
            # with shrink d_k = s_k^2 / (s_k^2 + alpha) the residual is
            # ||Yc||^2 - sum_k (2 d_k - d_k^2) ||(U^T Yc)_k||^2, and the fit's degrees of
            # freedom 1 + sum_k d_k (the intercept counts one).
            energy, total = uty.square().sum(dim=1), float(yc.square().sum())
            best, chosen = np.inf, self.alphas[0]
            for alpha in self.alphas:
                shrink = s2 / (s2 + alpha)
                residual = total - float(((2 * shrink - shrink * shrink) * energy).sum())
                dof = 1.0 + float(shrink.sum())
                gcv = residual / max(n - dof, 1e-12) ** 2
                if gcv < best:
                    best, chosen = gcv, alpha
            self.y_means.append(y_mean)
            self.coefs.append(vh.T @ (s[:, None] / (s2[:, None] + chosen) * uty))
            self.chosen_alphas.append(chosen)
        return self

    def queries(self, x: ArrayLike) -> list[torch.Tensor]:
        xc = _rows(x, "queries", self.device) - self.x_mean
        return [xc @ coef for coef in self.coefs]

    def candidates(self, j: int, y: ArrayLike) -> torch.Tensor:
        return _rows(y, f"candidates of target {j}", self.device) - self.y_means[j]


@dataclass(frozen=True)
class PcaBasis:
    """Principal axes (columns, by decreasing variance) of l2-normalised rows, about their mean.

    Fit it once on unlabelled rows (a whole vocabulary, all concepts) and hand it to
    :meth:`ProcrustesMap.fit` for every fold and permutation that shares those rows.
    """

    mean: torch.Tensor
    axes: torch.Tensor

    @classmethod
    def fit(cls, rows: ArrayLike, name: str = "PCA rows", device: str | None = None) -> PcaBasis:
        return cls.of(_rows(rows, name, resolve_device(device)))

    @classmethod
    def of(cls, rows: torch.Tensor) -> PcaBasis:
        """The basis of rows that are already l2-normalised float64 tensors."""
        mean = rows.mean(dim=0)
        _, s, vh = torch.linalg.svd(rows - mean, full_matrices=False)
        keep = int((s > s[0] * 1e-10).sum()) if len(s) and s[0] > 0 else 0
        return cls(mean, vh[:keep].T)


class ProcrustesMap:
    """PCA to the smaller width, then an orthogonal map from source to each target.

    The width is also capped at the number of training rows minus one: with fewer training
    rows than dimensions the rotation of the remaining axes is not determined by the data.

    The PCA of each side is fitted on ``pca_x`` / ``pca_ys`` when given (unlabelled rows of
    that space, e.g. a whole vocabulary, or a :class:`PcaBasis` already fitted on them) and on
    the training rows otherwise. ``queries`` are the rotated sources and ``candidates(j, Y)``
    the target rows in target j's PCA space.
    """

    def __init__(self, device: str | None = None):
        self.device = resolve_device(device)

    def _basis(self, given: ArrayLike | PcaBasis | None, rows: torch.Tensor, name: str):
        if given is None:
            return PcaBasis.of(rows)
        if isinstance(given, PcaBasis):
            return PcaBasis(given.mean.to(self.device), given.axes.to(self.device))
        return PcaBasis.of(_rows(given, name, self.device))

    def fit(
        self,
        x: ArrayLike,
        ys: Sequence[ArrayLike],
        pca_x: ArrayLike | PcaBasis | None = None,
        pca_ys: Sequence[ArrayLike | PcaBasis] | None = None,
    ) -> ProcrustesMap:
        x = _rows(x, "source", self.device)
        ys = [_rows(y, f"target {j}", self.device) for j, y in enumerate(ys)]
        _paired(x, ys, 2)
        x_basis = self._basis(pca_x, x, "source PCA rows")
        self.x_mean = x_basis.mean
        self.x_axes, self.y_means, self.y_axes, self.rotations = [], [], [], []
        for j, y in enumerate(ys):
            given = None if pca_ys is None else pca_ys[j]
            y_basis = self._basis(given, y, f"target {j} PCA rows")
            # Past the training rows' own rank the rotation is undetermined (any rotation of
            # the leftover axes fits equally well), and held-out rows would be turned by
            # rounding noise: cap the width there.
            width = min(x_basis.axes.shape[1], y_basis.axes.shape[1], len(x) - 1)
            if width == 0:
                raise MetricInputError(f"target {j}: no variance to fit a map on")
            xa, ya = x_basis.axes[:, :width], y_basis.axes[:, :width]
            u, _, vh = torch.linalg.svd(((x - self.x_mean) @ xa).T @ ((y - y_basis.mean) @ ya))
            self.x_axes.append(xa)
            self.y_means.append(y_basis.mean)
            self.y_axes.append(ya)
            self.rotations.append(u @ vh)
        return self

    def queries(self, x: ArrayLike) -> list[torch.Tensor]:
        xc = _rows(x, "queries", self.device) - self.x_mean
        return [(xc @ xa) @ w for xa, w in zip(self.x_axes, self.rotations, strict=True)]

    def candidates(self, j: int, y: ArrayLike) -> torch.Tensor:
        y = _rows(y, f"candidates of target {j}", self.device)
        return (y - self.y_means[j]) @ self.y_axes[j]


MAPS = {"ridge": RidgeMap, "procrustes": ProcrustesMap}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``."""
    return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
