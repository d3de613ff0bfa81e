"""What every metric implements, so that one engine can batch, resample and permute them all.

A metric scores a whole layer grid in two steps:

1. ``side(layers, opts, ctx)``: per-layer precomputation, once per layer (neighbour lists,
   normalised Gram vectors, SVDs, ...), for one side of the grid;
2. ``pairs(sx, sy, opts, ctx)``: every (x layer, y layer) score from the two sides, as one
   matrix product where the math allows.

``permute(sy, perm)`` returns the side that ``side`` would have built from the layers with
their rows permuted (``Y[perm]``); the permutation null reuses the per-layer work that way
instead of recomputing it for every permutation.

Sides are frozen dataclasses of tensors, so :func:`to_device` moves any of them (sharded
tasks pass them through Ray's object store on the CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .inputs import Context, LayerInput, resolve_options


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` (a side, or anything holding tensors) with every tensor moved to ``device``:
    sides travel between tasks through the object store on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value,
            **{
                f.name: to_device(getattr(value, f.name), device)
                for f in dataclasses.fields(value)
                if f.init
            },
        )
    return value


class Metric:
    """Base class: defaults, option checks and the minimum number of rows."""

    name: str = ""
    defaults: Mapping[str, Any] = {}

    def options(self, given: Mapping[str, Any]) -> dict:
        opts = resolve_options(self.name, self.defaults, given)
        self.check(opts)
        return opts

    def check(self, opts: dict) -> None:
        """Validate metric-specific option values (raise MetricInputError)."""

    def min_rows(self, opts: Mapping[str, Any]) -> tuple[int, str]:
        """Fewest items the metric is defined for, and why."""
        return 3, ""

    def plan(
        self, widths_x: Sequence[int], widths_y: Sequence[int], opts: dict, ctx: Context
    ) -> dict:
        """Choose an algorithm from the grid's shape (e.g. Gram or feature-space CKA)."""
        return opts

    def side_bytes(self, n: int, width: int, opts: Mapping[str, Any], itemsize: int) -> int:
        """Working memory of one layer's side at ``n`` rows (an estimate, for sizing tasks):
        by default the preprocessed copy of the layer."""
        return n * width * itemsize

    def side(self, layers: Sequence[LayerInput], opts: Mapping[str, Any], ctx: Context) -> Any:
        raise NotImplementedError

    def pairs(self, sx: Any, sy: Any, opts: Mapping[str, Any], ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def permute(self, sy: Any, perm: torch.Tensor) -> Any:
        raise NotImplementedError
