"""Input validation, option checking and preprocessing shared by every metric.

Everything a caller can get wrong is checked here, at the boundary, and reported as a
:class:`MetricInputError` whose message names the input by its label (for example
``"minilm_l6 layer 4: 3 NaN values"``). Past this module, metric code may assume finite 2-D
float tensors with paired rows.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlray.errors import VlrayError

# Sorting for per-column quantiles is done this many columns at a time, so that clamping a
# (100_000, 768) layer never needs more than a few hundred MB of scratch space.
_QUANTILE_COLUMNS = 64


class MetricInputError(VlrayError, ValueError):
    """Input that a metric cannot score: the message names the input, the layer and the problem."""


@dataclass(frozen=True)
class LayerInput:
    """One validated layer: a finite 2-D tensor on the caller's device, and its label."""

    data: torch.Tensor
    label: str

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def width(self) -> int:
        return self.data.shape[1]


def as_layer(a: Any, label: str) -> LayerInput:
    """Check one ``(n_items, dim)`` array (numpy, torch or nested lists) and wrap it.

    The data stay where they are (no copy for numpy or torch input): large layers can sit in
    host memory and move to the accelerator one at a time.
    """
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        try:
            arr = np.asarray(a)
        except (TypeError, ValueError) as e:
            raise MetricInputError(f"{label}: not an array ({e})") from None
        if arr.dtype.kind not in "biuf":
            raise MetricInputError(f"{label}: expected numeric values, got dtype {arr.dtype}")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("="))
        with warnings.catch_warnings():
            # Read-only numpy arrays are fine: nothing here writes into the caller's data.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
    if t.is_complex():
        raise MetricInputError(f"{label}: complex values are not supported")
    if t.ndim != 2:
        raise MetricInputError(
            f"{label}: expected a 2-D (n_items, dim) array, got shape {tuple(t.shape)}"
            + (" (reshape a single feature to (n, 1))" if t.ndim == 1 else "")
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise MetricInputError(f"{label}: empty array of shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        problems = [f"{n_nan} NaN values"] * bool(n_nan) + [f"{n_inf} infinite values"] * bool(
            n_inf
        )
        raise MetricInputError(f"{label}: {' and '.join(problems)}")
    return LayerInput(t, label)


def check_layers(
    xs: Any, ys: Any, labels_x: Any, labels_y: Any
) -> tuple[list[LayerInput], list[LayerInput]]:
    """Validate two lists of layers (and their labels); all layers must have the same rows."""
    sides = []
    for name, layers, labels in (("Xs", xs, labels_x), ("Ys", ys, labels_y)):
        if isinstance(layers, (np.ndarray, torch.Tensor)) and layers.ndim == 2:
            raise MetricInputError(f"{name}: expected a sequence of 2-D layers, got one 2-D array")
        layers = list(layers)
        if not layers:
            raise MetricInputError(f"{name}: no layers given")
        if labels is None:
            labels = [f"{name[0]} layer {i}" for i in range(len(layers))]
        labels = [str(s) for s in labels]
        if len(labels) != len(layers):
            raise MetricInputError(
                f"labels_{name[0].lower()}: {len(labels)} labels for {len(layers)} layers"
            )
        sides.append([as_layer(a, lab) for a, lab in zip(layers, labels, strict=True)])
    first = sides[0][0]
    for layer in sides[0] + sides[1]:
        if layer.n != first.n:
            raise MetricInputError(
                f"{layer.label}: {layer.n} rows, but {first.label} has {first.n}; "
                "row i of every layer must be the same item"
            )
    return sides[0], sides[1]


def check_not_constant(layer: LayerInput, metric: str) -> None:
    """An all-constant layer (every row identical) has no variance to compare."""
    x = layer.data
    if bool((x == x[:1]).all()):
        raise MetricInputError(
            f"{layer.label}: all {layer.n} rows are identical (zero variance); "
            f"{metric} is undefined"
        )


# ---------------------------------------------------------------------------------------------
# Options


PREPROCESS_OPTIONS = ("center", "l2", "clamp_quantile")


def resolve_options(metric: str, defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict:
    """Defaults overridden by ``given``; unknown names and bad preprocessing values raise."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise MetricInputError(
            f"{metric}: unknown option{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
            f"options are {', '.join(sorted(defaults))}"
        )
    opts = {**defaults, **given}
    for name in ("center", "l2"):
        if not isinstance(opts[name], (bool, np.bool_)):
            raise MetricInputError(f"{metric}: {name} must be True or False, got {opts[name]!r}")
    q = opts["clamp_quantile"]
    if q is not None and not (isinstance(q, (int, float)) and 0.5 < float(q) <= 1.0):
        raise MetricInputError(
            f"{metric}: clamp_quantile must be None or a number in (0.5, 1], got {q!r} "
            "(0.99 clamps each feature at its 1% and 99% quantiles)"
        )
    return opts


def int_option(metric: str, opts: Mapping[str, Any], name: str, minimum: int) -> int:
    v = opts[name]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise MetricInputError(f"{metric}: {name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def float_option(metric: str, opts: Mapping[str, Any], name: str, low: float, high: float) -> float:
    """A number in the half-open interval (low, high]."""
    v = opts[name]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not low < v <= high:
        raise MetricInputError(f"{metric}: {name} must be a number in ({low}, {high}], got {v!r}")
    return float(v)


def choice_option(metric: str, opts: Mapping[str, Any], name: str, choices: tuple[str, ...]) -> str:
    v = opts[name]
    if v not in choices:
        raise MetricInputError(f"{metric}: {name} must be one of {', '.join(choices)}, got {v!r}")
    return v


# ---------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when there is one, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MetricInputError(f"device {str(device)!r}: CUDA is not available on this machine")
    return dev


# Below this many items a CPU run computes in float64: it costs at most 2x and makes the
# scores agree with float64 references to ~1e-12 (kNN ranks never flip on rounding).
CPU_FLOAT64_MAX_N = 8192


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, n: int) -> torch.dtype:
    """float32 by default; float64 on CPU for ``n <= CPU_FLOAT64_MAX_N``, or when asked."""
    if dtype is None:
        small_cpu = device.type == "cpu" and n <= CPU_FLOAT64_MAX_N
        return torch.float64 if small_cpu else torch.float32
    table = {"float32": torch.float32, "float64": torch.float64}
    resolved = table.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float64):
        raise MetricInputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return resolved


# ---------------------------------------------------------------------------------------------
# Preprocessing


def column_quantiles(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-column ``q`` quantile with linear interpolation (numpy's default method).

    ``torch.quantile`` refuses inputs above 16M elements, so this sorts column chunks instead.
    """
    n = x.shape[0]
    pos = q * (n - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    hi = min(lo + 1, n - 1)
    out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[1], _QUANTILE_COLUMNS):
        cols = torch.sort(x[:, start : start + _QUANTILE_COLUMNS], dim=0).values
        out[start : start + _QUANTILE_COLUMNS] = cols[lo] + frac * (cols[hi] - cols[lo])
    return out


@dataclass(frozen=True)
class Preprocessor:
    """Fitted preprocessing of one layer, re-applicable to row blocks of the same layer."""

    low: torch.Tensor | None  # per-feature clamp bounds (None: no clamping)
    high: torch.Tensor | None
    mean: torch.Tensor | None  # column means after clamping (None: no centring)
    unit_rows: bool  # scale rows to unit norm last

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.low is not None:
            x = torch.clamp(x, min=self.low, max=self.high)
        if self.mean is not None:
            x = x - self.mean
        if self.unit_rows:
            x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return x


def fit_preprocess(
    x: torch.Tensor, opts: Mapping[str, Any], label: str, unit_rows: bool = False
) -> tuple[torch.Tensor, Preprocessor]:
    """Clamp outliers per feature, then centre columns, then scale rows to unit norm.

    The order matters: quantiles are taken on raw values, the mean after clamping, and the
    norm after centring (so ``center=True, l2=True`` gives cosine similarity of centred data).
    ``unit_rows`` forces the l2 step for metrics defined by cosine similarity.
    Returns the preprocessed layer and the fitted steps (for streaming the same transform).
    """
    q = opts["clamp_quantile"]
    low = high = mean = None
    if q is not None and q < 1.0:
        low, high = column_quantiles(x, 1.0 - q), column_quantiles(x, q)
        x = torch.clamp(x, min=low, max=high)
    if opts["center"]:
        mean = x.mean(dim=0, keepdim=True)
        x = x - mean
    unit = bool(opts["l2"] or unit_rows)
    if unit:
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        n_zero = int((norms == 0).sum())
        if n_zero:
            what = "centring and clamping" if opts["center"] or low is not None else "input"
            raise MetricInputError(
                f"{label}: {n_zero} rows have zero norm after {what}; "
                "cosine similarity / l2 normalisation is undefined for them"
            )
        x = x / norms
    return x, Preprocessor(low, high, mean, unit)


def preprocess(
    x: torch.Tensor, opts: Mapping[str, Any], label: str, unit_rows: bool = False
) -> torch.Tensor:
    """:func:`fit_preprocess` without the fitted steps."""
    return fit_preprocess(x, opts, label, unit_rows)[0]


@dataclass(frozen=True)
class Context:
    """Where and how a grid is computed, and which rows of the layers it sees.

    ``rows`` is ``None`` for the layers as given, else the row indices of a bootstrap
    resample (with repeats). Metrics that cannot treat repeated rows as independent items
    (kNN, RSA, cross-validation) use ``rows`` as the item identity of each resampled row.
    """

    metric: str
    device: torch.device
    dtype: torch.dtype
    n: int
    rows: torch.Tensor | None = None
    # A cap on streaming workspaces (similarity row blocks, feature row blocks, Gram product
    # chunks) below their defaults: a sharded task's memory budget. None: the defaults.
    scratch_bytes: int | None = None

    def scratch(self, default: int) -> int:
        """Bytes a streaming workspace whose default size is ``default`` may use here."""
        return default if self.scratch_bytes is None else min(default, self.scratch_bytes)

    def load(
        self,
        layer: LayerInput,
        opts: Mapping[str, Any],
        *,
        unit_rows: bool = False,
        distinct: bool = False,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The layer's rows in this sample on the compute device, preprocessed.

        ``distinct`` keeps one row per distinct item of a resample (in :meth:`items` order).
        """
        return self.fit(layer, opts, unit_rows=unit_rows, distinct=distinct, dtype=dtype)[0]

    def fit(
        self,
        layer: LayerInput,
        opts: Mapping[str, Any],
        *,
        unit_rows: bool = False,
        distinct: bool = False,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, Preprocessor]:
        """:meth:`load`, and the fitted preprocessing for streaming the same rows later."""
        x = layer.data
        rows = self.rows
        if rows is not None:
            x = x[(torch.unique(rows) if distinct else rows).to(x.device)]
        x = x.to(device=self.device, dtype=dtype or self.dtype)
        return fit_preprocess(x, opts, layer.label, unit_rows=unit_rows)

    def items(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Distinct items of the sample and how many times each was drawn (all ones if none)."""
        if self.rows is None:
            return None, torch.ones(self.n, dtype=torch.float64, device=self.device)
        distinct, counts = torch.unique(self.rows, return_counts=True)
        return distinct, counts.to(device=self.device, dtype=torch.float64)

    def groups(self) -> torch.Tensor | None:
        """Item identity of each row on the compute device (None when every row is its own)."""
        return None if self.rows is None else self.rows.to(self.device)
