"""``score`` and ``grid``: validate once, precompute per layer, score all pairs together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from .base import Metric
from .cca import Pwcca, Svcca
from .inputs import (
    Context,
    LayerInput,
    MetricInputError,
    check_layers,
    check_not_constant,
    resolve_device,
    resolve_dtype,
)
from .kernels import Cka, CkaRbf, Rsa, UnbiasedCka
from .knn import Cknna, MutualKnn
from .predictive import LinearPredictivity, ProcrustesRetrieval

_REGISTRY: dict[str, Metric] = {
    m.name: m
    for m in (
        MutualKnn(),
        Cka(),
        UnbiasedCka(),
        CkaRbf(),
        Cknna(),
        Rsa(),
        Svcca(),
        Pwcca(),
        LinearPredictivity(),
        ProcrustesRetrieval(),
    )
}

METRICS: tuple[str, ...] = tuple(_REGISTRY)


def get_metric(name: str) -> Metric:
    """The metric called ``name`` (raises MetricInputError for an unknown name)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MetricInputError(
            f"unknown metric {name!r}; choose from {', '.join(METRICS)}"
        ) from None


@dataclass(frozen=True)
class Problem:
    """A validated grid request: the metric, its options, both sides' layers and the device."""

    metric: Metric
    opts: dict
    xs: list[LayerInput]
    ys: list[LayerInput]
    device: torch.device
    dtype: torch.dtype
    scratch_bytes: int | None = None

    @property
    def n(self) -> int:
        return self.xs[0].n

    def context(self, rows: torch.Tensor | None = None) -> Context:
        return Context(self.metric.name, self.device, self.dtype, self.n, rows, self.scratch_bytes)

    def sides(self, ctx: Context) -> tuple[Any, Any]:
        return self.metric.side(self.xs, self.opts, ctx), self.metric.side(self.ys, self.opts, ctx)

    def evaluate(self, sx: Any, sy: Any, ctx: Context) -> np.ndarray:
        out = self.metric.pairs(sx, sy, self.opts, ctx).detach().to("cpu", torch.float64).numpy()
        bad = np.argwhere(~np.isfinite(out))
        if len(bad):  # a guard: every undefined case should have been caught as bad input
            i, j = bad[0]
            raise MetricInputError(
                f"{self.xs[i].label} vs {self.ys[j].label}: {self.metric.name} is undefined "
                "for this input"
            )
        return out

    def value(self) -> np.ndarray:
        ctx = self.context()
        return self.evaluate(*self.sides(ctx), ctx)


def check_rows(impl: Metric, opts: dict, n: int, label: str) -> None:
    """Refuse fewer rows than the metric is defined for, naming the layer and why."""
    need, why = impl.min_rows(opts)
    if n < need:
        raise MetricInputError(
            f"{label}: {n} rows; {impl.name} needs at least {need}" + (f" ({why})" if why else "")
        )


def setup(
    xs: Sequence[ArrayLike],
    ys: Sequence[ArrayLike],
    metric: str,
    labels_x: Sequence[str] | None,
    labels_y: Sequence[str] | None,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    options: dict[str, Any],
    scratch_bytes: int | None = None,
) -> Problem:
    """Check everything about a request before any computation starts."""
    impl = get_metric(metric)
    opts = impl.options(options)
    layers_x, layers_y = check_layers(xs, ys, labels_x, labels_y)
    n = layers_x[0].n
    check_rows(impl, opts, n, layers_x[0].label)
    for layer in layers_x + layers_y:
        check_not_constant(layer, impl.name)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, n)
    problem = Problem(impl, opts, layers_x, layers_y, dev, dt, scratch_bytes)
    planned = impl.plan(
        [x.width for x in layers_x], [y.width for y in layers_y], opts, problem.context()
    )
    return Problem(impl, planned, layers_x, layers_y, dev, dt, scratch_bytes)


def grid(
    Xs: Sequence[ArrayLike],
    Ys: Sequence[ArrayLike],
    metric: str,
    *,
    labels_x: Sequence[str] | None = None,
    labels_y: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kw: Any,
) -> np.ndarray:
    """Score every (X layer, Y layer) pair: an array of shape ``(len(Xs), len(Ys))``.

    Each layer is processed once (neighbour lists, normalised Gram vectors, SVDs, ...) and
    the pairs are combined together, in one matrix product where the metric allows (see
    :mod:`vlray.metrics`). Layers may be numpy arrays or torch tensors on any device; they are
    moved to ``device`` one at a time.

    Device memory (inputs may stay in host memory; layers are moved one at a time):
    mutual_knn and cknna hold each layer's ``n x k`` neighbour table and search in row blocks
    of at most 256 MiB, under 2 GB for a 13 x 13 grid at n = 100,000, d = 768; cka streams
    feature-space cross-covariances, O(Dx * Dy) for summed widths D, unless the n x n Gram
    path is cheaper and fits 2 GiB; unbiased_cka, cka_rbf and rsa hold ``n (n + 1) / 2``
    values per layer; the SVD-based metrics hold each layer's ``n x min(n, d)`` basis.

    Args:
        Xs, Ys: ``(n_items, dim)`` arrays, row i of every layer being item i; widths may
            differ between layers.
        metric: one of :data:`METRICS`.
        labels_x, labels_y: names used in error messages (default "X layer 0", ...).
        device: torch device; default CUDA when available, else CPU.
        dtype: "float32" or "float64"; default float64 on CPU for n <= 8192, else float32.
            (SVD/CCA-based metrics always compute in float64.)
        **kw: the metric's options, see :func:`metric_options`.

    Raises:
        MetricInputError: bad input, naming the layer (NaN/inf values, 1-D arrays, mismatched
            rows, too few rows, constant layers, unknown metric or option).
    """
    return setup(Xs, Ys, metric, labels_x, labels_y, device, dtype, kw).value()


def score(
    X: ArrayLike,
    Y: ArrayLike,
    metric: str,
    *,
    label_x: str = "X",
    label_y: str = "Y",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kw: Any,
) -> float:
    """The ``metric`` between paired ``(n_items, dim)`` arrays ``X`` and ``Y`` (a 1 x 1 grid)."""
    return float(
        grid(
            [X],
            [Y],
            metric,
            labels_x=[label_x],
            labels_y=[label_y],
            device=device,
            dtype=dtype,
            **kw,
        )[0, 0]
    )


def metric_options(metric: str) -> dict[str, Any]:
    """The options ``metric`` accepts and their defaults (preprocessing included)."""
    return dict(get_metric(metric).defaults)
