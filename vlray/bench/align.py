"""``vlray bench align``: the layerwise study as one task, sharded on the local Ray, and
sharded on a real two-node Ray cluster, side by side in one run.

The lake is synthetic (:mod:`vlray.bench.synthetic`): two "models" with structured random
embeddings whose alignment peaks at known layers, written through the lake's normal commit
path, so the answer is known and no model runs. The same ``vlray.align.run_align`` call then
scores it three ways:

(a) ``shard=False``: the whole grid, its resamples and permutations in one Ray task;
(b) ``shard=True`` on a local Ray with every core of this machine;
(c) ``shard=True`` on a two-node cluster on this machine (`ray start --head` and a node
    joining it, as the multi-node test starts them), one core each, the lake on the shared
    local disk;
(d) (b) with ``memory_per_task`` a third of the pair's embeddings: small blocks, every task
    under the budget, at the price of redoing each resample's per-layer work per block.

Each row: wall seconds of the align call, speedup over (a), Ray tasks, the largest task's
peak memory (its worker's resident-set high-water mark, less its size when the task began),
the budget and the pair's embeddings, whether the grid's maximum is the planted peak, and the
largest difference of any score (value, interval, null mean and sd, p-value) from (a).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from vlray.options import DEFAULT_MEMORY_PER_TASK

FIELDS = ("value", "ci_low", "ci_high", "null_mean", "null_sd", "p_value")


def _grid(uri: str, metric: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    from vlray.lake import Lake

    table = Lake(uri).read("alignment", {"study": "layerwise", "metric": metric})
    out = {f: np.full(shape, np.nan) for f in FIELDS}
    rows = table.to_pylist()
    if len(rows) != shape[0] * shape[1]:
        raise RuntimeError(f"expected {shape[0] * shape[1]} layerwise scores, got {len(rows)}")
    for r in rows:
        for f in FIELDS:
            out[f][r["vision_layer"], r["language_layer"]] = r[f]
    return out


def _align(planted, metric: str, **options) -> tuple[float, dict]:
    from vlray.align import run_align
    from vlray.options import AlignOptions

    opts = AlignOptions(studies=("layerwise",), metrics=(metric,), **options)
    began = time.perf_counter()
    (summary,) = run_align(planted.uri, [planted.dataset], [planted.vision, planted.language], opts)
    seconds = time.perf_counter() - began
    # the pair's Ray tasks: one for (a), the grid's shards otherwise
    return seconds, {**summary["studies"]["layerwise"], "tasks": summary["tasks"]}


def bench_align(
    *,
    n: int = 9000,
    layers: tuple[int, int] = (14, 14),
    widths: tuple[int, int] = (64, 64),
    bootstrap: int = 100,
    permutations: int = 100,
    metric: str = "cka",
    memory_per_task: int = DEFAULT_MEMORY_PER_TASK,
    two_node: bool = True,
    lake: str | None = None,
) -> list[dict]:
    """Write the planted lake, then time (a), (b), (c) and (d); one row of figures each.

    (b) and (c) run at ``memory_per_task``; (d) is (b) at a third of the pair's embeddings,
    where blocks must be small and each bootstrap resample's per-layer work is redone for
    every block of the other side. n above 8,192 computes in float32 on a CPU.
    """
    import ray

    from vlray.bench.synthetic import write_planted_lake

    with tempfile.TemporaryDirectory(prefix="vlray-bench-align-") as tmp:
        uri = lake or os.path.join(tmp, "lake")
        planted = write_planted_lake(uri, n=n, layers=layers, widths=widths)
        small = planted.embeddings_bytes() // 3
        scoring = {"bootstrap": bootstrap, "permutations": permutations}
        runs = [
            ("(a) one task", memory_per_task, {"shard": False}),
            ("(b) sharded, local Ray", memory_per_task, {}),
            ("(d) sharded, budget = embeddings / 3", small, {}),
        ]
        results = []
        if not ray.is_initialized():
            ray.init(
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        for name, budget, extra in runs:
            seconds, study = _align(planted, metric, memory_per_task=budget, **scoring, **extra)
            grid = _grid(uri, metric, layers) if "rows" in study else None
            results.append((name, budget, seconds, study, grid))
        if two_node:
            from vlray.bench.localcluster import LocalCluster

            ray.shutdown()
            cluster = LocalCluster()
            try:
                cluster.start(workers=1)
                with cluster.driver(log_to_driver=False):
                    seconds, study = _align(
                        planted, metric, memory_per_task=memory_per_task, **scoring
                    )
                grid = _grid(uri, metric, layers)
                results.insert(
                    2, ("(c) sharded, 2-node cluster", memory_per_task, seconds, study, grid)
                )
            finally:
                cluster.stop()
    base_seconds, base = results[0][2], results[0][4]
    rows = []
    for name, budget, seconds, study, grid in results:
        if grid is None:  # e.g. (d) on a grid too small for a third of it to hold a layer
            rows.append({"run": name, "note": study.get("failed") or study.get("skipped")})
            continue
        peak = np.unravel_index(np.argmax(grid["value"]), grid["value"].shape)
        rows.append(
            {
                "run": name,
                "grid": f"{layers[0]}x{layers[1]}",
                "n": n,
                "resamples+perms": f"{bootstrap}+{permutations}",
                "wall s": round(seconds, 1),
                "speedup": round(base_seconds / seconds, 2),
                "tasks": study["tasks"],
                "peak task MiB": round(study["peak_task_bytes"] / 2**20, 1),
                "budget MiB": round(budget / 2**20, 1),
                "embeddings MiB": round(planted.embeddings_bytes() / 2**20, 1),
                "planted peak found": tuple(int(i) for i in peak) == planted.peak,
                "max |diff| vs (a)": float(
                    max(np.nanmax(np.abs(grid[f] - base[f])) for f in FIELDS)
                ),
            }
        )
    return rows


def measured_unit(
    seconds: float,
    n: int,
    layers: tuple[int, int],
    widths: tuple[int, int],
    evaluations: int,
    cores: int,
) -> float:
    """CPU-seconds per unit of feature-space CKA work (``paper_scale.cka_units``): a run's
    wall time times the cores it had, over its grid's work."""
    from vlray.bench.paper_scale import cka_units

    units = cka_units(n, [widths[0]] * layers[0], [widths[1]] * layers[1], evaluations)
    return seconds * cores / units
