"""Benchmarks of the alignment engine: batched ``grid`` against a loop over ``score``.

Used by ``vlray bench metrics``. Data are random layers sharing a latent factor whose weight
grows with depth, so scores are non-trivial and differ between layer pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from time import perf_counter
from typing import Any

import numpy as np
import torch

from vlray.metrics import grid, score
from vlray.metrics.inputs import resolve_device

LATENT_DIM = 64


def synthetic_layers(
    n: int, dim: int, layers: int, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two models' layers, ``(n, dim)`` float32 on ``device``, sharing a latent factor."""
    gen = torch.Generator(device=device).manual_seed(seed)
    latent = torch.randn(n, LATENT_DIM, generator=gen, device=device)

    def model() -> list[torch.Tensor]:
        out = []
        for i in range(layers):
            w = torch.randn(LATENT_DIM, dim, generator=gen, device=device) / LATENT_DIM**0.5
            noise = torch.randn(n, dim, generator=gen, device=device)
            out.append((i + 1) / layers * 2 * (latent @ w) + noise)
        return out

    return model(), model()


def bench_metrics(
    n: int = 2048,
    dim: int = 768,
    layers: int = 13,
    metrics: Sequence[str] = ("mutual_knn", "cka"),
    device: str | None = None,
    repeats: int = 1,
    seed: int = 0,
    dtype: str | None = None,
    inputs: str = "host",
) -> list[dict[str, Any]]:
    """Time ``grid`` against a Python loop over ``score`` on the same layers, per metric.

    ``inputs``: ``host`` (numpy arrays, as read from the lake) or ``device`` (tensors already
    on ``device``, so that only computation is timed).

    Both run the same engine on the same device and precision (``dtype`` default: float64 on
    CPU at this size, float32 on GPU); the loop redoes each layer's precomputation for every
    pair, which is what ``grid`` saves. Times are the best of ``repeats``.

    Returns:
        One row per metric: metric, n, dim, layers, device, grid_seconds, loop_seconds,
        speedup, max_abs_diff (between the two results).
    """
    dev = resolve_device(device)
    xs, ys = synthetic_layers(n, dim, layers, seed)
    if inputs == "device":  # already on the GPU: times the computation, not PCIe transfers
        xs, ys = [x.to(dev) for x in xs], [y.to(dev) for y in ys]
    else:  # host arrays, as read from the lake: every score call moves its two layers again
        xs, ys = [x.numpy() for x in xs], [y.numpy() for y in ys]
    rows = []
    for metric in metrics:
        # Untimed warm-up: CUDA context, cuBLAS handles and kernel loading belong to neither.
        grid(xs[:2], ys[:2], metric, device=dev, dtype=dtype)
        score(xs[0], ys[0], metric, device=dev, dtype=dtype)
        grid_times, loop_times = [], []
        for _ in range(repeats):
            t0 = perf_counter()
            batched = grid(xs, ys, metric, device=dev, dtype=dtype)
            grid_times.append(perf_counter() - t0)
            t0 = perf_counter()
            looped = np.array(
                [[score(x, y, metric, device=dev, dtype=dtype) for y in ys] for x in xs]
            )
            loop_times.append(perf_counter() - t0)
        g, lp = min(grid_times), min(loop_times)
        rows.append(
            {
                "metric": metric,
                "n": n,
                "dim": dim,
                "layers": layers,
                "device": str(dev),
                "inputs": inputs,
                "grid_seconds": g,
                "loop_seconds": lp,
                "speedup": lp / g,
                "max_abs_diff": float(np.abs(np.asarray(batched) - looped).max()),
            }
        )
    return rows


def bench_knn_memory(
    n: int = 100_000, dim: int = 768, layers: int = 13, device: str = "cuda"
) -> dict[str, Any]:
    """Peak GPU memory of one ``layers x layers`` mutual_knn grid at large ``n``.

    The layers are generated on the GPU, then kept in host memory (as a pipeline reading
    Parquet would hold them), so the peak counts only what ``grid`` allocates. Without a GPU
    this prints why and returns a row with ``skipped`` set.
    """
    row: dict[str, Any] = {"metric": "mutual_knn", "n": n, "dim": dim, "layers": layers}
    if not torch.cuda.is_available() or torch.device(device).type != "cuda":
        row["skipped"] = f"no CUDA GPU for device {device!r}; the memory benchmark needs one"
        print(row["skipped"])
        return row
    dev = torch.device(device)
    xs, ys = synthetic_layers(n, dim, layers, seed=0, device=dev)
    xs, ys = [x.cpu() for x in xs], [y.cpu() for y in ys]
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = perf_counter()
    g = grid(xs, ys, "mutual_knn", device=dev)
    seconds = perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev)
    row.update(
        device=torch.cuda.get_device_name(dev),
        seconds=seconds,
        max_memory_allocated_gib=peak / 2**30,
        within_16_gib=peak < 16 * 2**30,
        score_min=float(g.min()),
        score_max=float(g.max()),
    )
    return row
