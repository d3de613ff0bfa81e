"""A layer grid's scores, bootstrap interval and permutation null, computed by many Ray tasks.

The work of :func:`vlray.metrics.grid_stats` is split two ways:

- **by block of layers.** An eighth of ``memory_per_task`` is the task's streaming workspace
  (similarity row blocks, feature row blocks, Gram product chunks: ``Context.scratch_bytes``);
  each side's layers are cut into consecutive blocks whose working memory (the layer as read,
  its compute copies and the metric's per-layer precomputation, ``Metric.side_bytes``) fits
  half of the rest. A task holds one x block and one y block, never a whole stack;
- **by shard of resamples and of permutations.** Bootstrap resample b and permutation p depend
  only on (seed, n, b or p), so any shard can run on any node, in any order.

The tasks of one grid, all scheduled with Ray's own resources and retried by Ray when their
worker dies (``max_retries``):

============  ===============================================================================
read          one block's layers as paired rows, read from the lake one layer at a time
              (column and partition pruned), one object-store entry per layer
side          one block's precomputation on the data as given (neighbour tables, Gram
              vectors, feature statistics), computed once and shared through the object store
              with every block pair it is part of
null          (x block, y block, permutation shard): the null scores, from the shared sides
              (and the grid's value, in a block's first shard)
bootstrap     (x block, y block, resample shard): the grid on each resample, from the layers
============  ===============================================================================

The driver joins the blocks and shards and summarises them exactly as ``grid_stats`` does
(:func:`vlray.metrics.stats.summarise`), so the numbers are the same up to float rounding.
Each task reports the peak memory it added to its worker (the worker's resident-set high-water
mark over the task, less its size at the start), which is what ``memory_per_task`` bounds.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import ray
import torch
from ray.exceptions import RayTaskError

from vlray.metrics import GridStats, MetricInputError
from vlray.metrics.base import to_device
from vlray.metrics.engine import check_rows, get_metric, setup
from vlray.metrics.inputs import Context, as_layer, resolve_dtype
from vlray.metrics.stats import (
    check_confidence,
    check_count,
    null_scores,
    replicates,
    summarise,
)
from vlray.options import DEFAULT_MEMORY_PER_TASK

# Shards per worker: enough that unequal shards still keep every worker busy to the end,
# few enough that per-task overhead (a few ms, plus reading the block) stays small.
SHARDS_PER_WORKER = 2
# Compute copies of a layer alive at once in a task (the converted copy and the preprocessed
# one; transients beyond these come out of the workspace share), checked by measurement in
# tests/test_shards.py and `vlray bench align`.
_COPIES_IN_FLIGHT = 2
# Ray retries a task whose worker died this many times before the study fails.
MAX_RETRIES = 3

__all__ = [
    "ArrayLayers",
    "GridPlan",
    "LayerSource",
    "PeakMemory",
    "PendingGrid",
    "ShardReport",
    "cluster_workers",
    "grid_stats",
    "layer_bytes",
    "min_memory_per_task",
    "plan_grid",
    "submit",
]


class LayerSource(Protocol):
    """One side of a grid: ``n`` paired rows per layer, read a block of layers at a time."""

    labels: tuple[str, ...]
    widths: tuple[int, ...]

    @property
    def n(self) -> int: ...

    def load(self, layers: Sequence[int]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class ArrayLayers:
    """Layers already in memory, each put in the object store once (see :meth:`put`)."""

    refs: tuple[Any, ...]
    labels: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]

    @classmethod
    def put(cls, arrays: Sequence[np.ndarray], labels: Sequence[str] | None = None) -> ArrayLayers:
        labels = tuple(labels or [f"layer {i}" for i in range(len(arrays))])
        if not len(arrays) or len(labels) != len(arrays):
            raise MetricInputError(
                f"expected at least one layer and one label per layer, got {len(arrays)} "
                f"layers and {len(labels)} labels"
            )
        layers = [as_layer(a, label) for a, label in zip(arrays, labels, strict=True)]
        for layer in layers[1:]:
            if layer.n != layers[0].n:
                raise MetricInputError(
                    f"{layer.label}: {layer.n} rows, but {layers[0].label} has {layers[0].n}"
                )
        return cls(
            tuple(ray.put(np.asarray(a)) for a in arrays),
            labels,
            tuple((layer.n, layer.width) for layer in layers),
        )

    @property
    def n(self) -> int:
        return self.shapes[0][0]

    def load(self, layers: Sequence[int]) -> list[np.ndarray]:
        return ray.get([self.refs[i] for i in layers])

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(w for _, w in self.shapes)


@dataclass(frozen=True)
class GridPlan:
    """How one grid is cut: layer blocks of each side and shards of resamples/permutations.

    There is always at least one permutation shard (possibly empty): a block's first one also
    computes the grid's value."""

    blocks_x: tuple[tuple[int, ...], ...]
    blocks_y: tuple[tuple[int, ...], ...]
    bootstrap_shards: tuple[range, ...]
    permutation_shards: tuple[range, ...]
    block_bytes: int  # the largest block pair's estimated working memory

    def tasks(self, reads: bool = True) -> int:
        """Tasks of the grid: a side per block (and a read per block with ``reads``), then a
        null task per block pair and permutation shard, a bootstrap task per resample shard."""
        blocks = len(self.blocks_x) + len(self.blocks_y)
        pairs = len(self.blocks_x) * len(self.blocks_y)
        shards = len(self.bootstrap_shards) + len(self.permutation_shards)
        return blocks * (2 if reads else 1) + pairs * shards


def scratch_bytes(memory_per_task: int) -> int:
    """The streaming workspace of a task with this budget."""
    return memory_per_task // 8


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def _split(costs: list[int], labels: Sequence[str], half: int, n: int) -> tuple[tuple, ...]:
    """The fewest consecutive, equal-count blocks of layers whose costs each fit ``half``."""
    for i, c in enumerate(costs):
        if c > half:
            raise MetricInputError(
                f"{labels[i]}: one layer needs about {_mib(c)} at n={n}, more than a task with "
                f"memory_per_task {_mib(half * 16 / 7)} holds per side; raise "
                f"align.memory_per_task to at least {_mib(c * 16 / 7 + (1 << 20))}"
            )
    for m in range(max(1, math.ceil(sum(costs) / half)), len(costs) + 1):
        parts = np.array_split(np.arange(len(costs)), m)
        if all(sum(costs[i] for i in p) <= half for p in parts):
            return tuple(tuple(int(i) for i in p) for p in parts)
    raise AssertionError("one layer per block always fits")  # pragma: no cover


def _shards(total: int, parts: int) -> tuple[range, ...]:
    parts = max(1, min(parts, total))
    bounds = np.linspace(0, total, parts + 1).round().astype(int)
    return tuple(range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True))


def layer_bytes(n: int, width: int, metric: str, opts: dict, itemsize: int) -> int:
    """One layer's estimated working memory in a task: the layer as read (float32), its
    compute copies in flight, and the metric's precomputation (``Metric.side_bytes``)."""
    copies = _COPIES_IN_FLIGHT * n * width * itemsize
    return n * width * 4 + copies + get_metric(metric).side_bytes(n, width, opts, itemsize)


def _per_side(memory_per_task: int) -> int:
    return (memory_per_task - scratch_bytes(memory_per_task)) // 2


def min_memory_per_task(
    n: int, widths: Sequence[int], metric: str, opts: dict, itemsize: int = 8
) -> int:
    """The smallest ``memory_per_task`` whose blocks hold the widest of ``widths``."""
    need = max(layer_bytes(n, w, metric, opts, itemsize) for w in widths)
    budget = need * 16 // 7
    while _per_side(budget) < need:
        budget += 1 << 20
    return budget


def plan_grid(
    n: int,
    widths_x: Sequence[int],
    widths_y: Sequence[int],
    metric: str,
    opts: dict,
    *,
    n_bootstrap: int,
    n_permutations: int,
    memory_per_task: int,
    workers: int,
    itemsize: int = 8,
    labels_x: Sequence[str] | None = None,
    labels_y: Sequence[str] | None = None,
) -> GridPlan:
    """Cut a grid so that each task's estimated memory fits ``memory_per_task`` and the
    resample shards give every one of ``workers`` about :data:`SHARDS_PER_WORKER` tasks.

    ``opts`` are the metric's resolved options (after ``Metric.plan``): they decide its
    per-layer memory. A layer that alone needs more than half the budget is an error that
    names it and the budget it needs."""
    half = _per_side(memory_per_task)
    costs_x = [layer_bytes(n, w, metric, opts, itemsize) for w in widths_x]
    costs_y = [layer_bytes(n, w, metric, opts, itemsize) for w in widths_y]
    blocks_x = _split(costs_x, labels_x or [f"x layer {i}" for i in range(len(costs_x))], half, n)
    blocks_y = _split(costs_y, labels_y or [f"y layer {i}" for i in range(len(costs_y))], half, n)
    per_block = max(1, math.ceil(SHARDS_PER_WORKER * workers / (len(blocks_x) * len(blocks_y))))
    block_bytes = max(sum(costs_x[i] for i in b) for b in blocks_x) + max(
        sum(costs_y[i] for i in b) for b in blocks_y
    )
    return GridPlan(
        blocks_x,
        blocks_y,
        _shards(n_bootstrap, per_block) if n_bootstrap else (),
        _shards(n_permutations, per_block) if n_permutations else (range(0),),
        block_bytes,
    )


# ---------------------------------------------------------------------------------------------
# Task bodies. Each returns the memory it added to its worker, measured by the kernel.


def _rss_high_water() -> tuple[int, int]:
    """(current resident set, high-water mark) of this process in bytes, from /proc."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(rest.split()[0]) * 1024
    return found["VmRSS"], found["VmHWM"]


# glibc's M_MMAP_THRESHOLD: allocations from this size on are mapped and unmapped on their
# own. Setting it fixes it (glibc otherwise raises it after each large free, up to 32 MiB), so
# a layer's freed copies go back to the system instead of fragmenting the heap: measured, a
# task's peak then stays flat over a hundred resamples instead of creeping up.
_M_MMAP_THRESHOLD = -3
_MMAP_FROM = 1 << 20


def _warm_up() -> None:
    """Start torch's thread pools and linear-algebra workspaces, which the first operations
    of a worker allocate once for its life: the worker's baseline, not a task's memory. And
    return large freed blocks to the system (glibc)."""
    global _WARM
    if not _WARM:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to set
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM)
        a = torch.ones((64, 64), dtype=torch.float64)
        torch.linalg.svd(a @ a.T + torch.eye(64, dtype=torch.float64))
        torch.linalg.eigh(a.T @ a)
        _WARM = True


_WARM = False


class PeakMemory:
    """The peak growth of this process's resident set while the block runs (Linux).

    Resets the kernel's high-water mark (``clear_refs`` 5), so an earlier task in the same
    worker does not count."""

    def __enter__(self) -> PeakMemory:
        _warm_up()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not Linux, or not permitted: the mark then covers the worker's life
            pass
        self.start = _rss_high_water()[0]
        self.peak = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(0, _rss_high_water()[1] - self.start)


def _prepare(cpus: float, metric: str, opts: dict, device: str, dtype: str) -> None:
    """Threads for this task's CPU share, and, once per worker and metric, the metric run on
    a few random rows: code paths allocate workspaces the first time they run, which belong
    to the worker's baseline, not to the first task's measured memory."""
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(cpus)))
    key = (metric, device, dtype)
    if key in _WARMED:
        return
    _warm_up()
    n = max(32, get_metric(metric).min_rows(opts)[0] + 8)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(n, 8)) for _ in range(2)]
    problem = setup(xs, xs[::-1], metric, None, None, device, dtype, opts)
    ctx = problem.context()
    sx, sy = problem.sides(ctx)
    null_scores(problem, sx, sy, [0], 0)
    replicates(problem, [0], 0)
    _WARMED.add(key)


_WARMED: set[tuple[str, str, str]] = set()


def _read_block(source: LayerSource, layers: tuple[int, ...]) -> Any:
    """A block's layers, read together; one object-store entry each (Ray's ``num_returns``),
    so any task can take any layer."""
    arrays = tuple(np.ascontiguousarray(a) for a in source.load(layers))
    return arrays[0] if len(arrays) == 1 else arrays


def _side_of_block(
    metric: str,
    opts: dict,
    labels: tuple[str, ...],
    device: str,
    dtype: str,
    cpus: float,
    scratch: int,
    *arrays: np.ndarray,
) -> tuple[Any, int]:
    _prepare(cpus, metric, opts, device, dtype)
    with PeakMemory() as mem:
        ctx = Context(
            metric, torch.device(device), getattr(torch, dtype), arrays[0].shape[0], None, scratch
        )
        layers = [as_layer(a, label) for a, label in zip(arrays, labels, strict=True)]
        side = to_device(get_metric(metric).side(layers, opts, ctx), "cpu")
    return side, mem.peak


@dataclass(frozen=True)
class _Block:
    """What a null or bootstrap task needs besides its arrays (which travel as arguments, so
    that Ray resolves them from the object store)."""

    metric: str
    opts: dict
    labels_x: tuple[str, ...]
    labels_y: tuple[str, ...]
    device: str
    dtype: str
    seed: int
    indices: range
    cpus: float
    scratch: int

    def problem(self, arrays: Sequence[np.ndarray]):
        nx = len(self.labels_x)
        return setup(
            arrays[:nx],
            arrays[nx:],
            self.metric,
            self.labels_x,
            self.labels_y,
            self.device,
            self.dtype,
            self.opts,
            self.scratch,
        )


def _null_block(
    block: _Block, want_value: bool, side_x: Any, side_y: Any, *arrays: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray, int]:
    _prepare(block.cpus, block.metric, block.opts, block.device, block.dtype)
    with PeakMemory() as mem:
        problem = block.problem(arrays)
        sx = to_device(side_x, problem.device)
        sy = to_device(side_y, problem.device)
        value = problem.evaluate(sx, sy, problem.context()) if want_value else None
        nulls = null_scores(problem, sx, sy, block.indices, block.seed)
    return value, nulls, mem.peak


def _bootstrap_block(block: _Block, *arrays: np.ndarray) -> tuple[np.ndarray, int]:
    _prepare(block.cpus, block.metric, block.opts, block.device, block.dtype)
    with PeakMemory() as mem:
        reps = replicates(block.problem(arrays), block.indices, block.seed)
    return reps, mem.peak


# ---------------------------------------------------------------------------------------------
# The driver side.


@dataclass
class ShardReport:
    """What a sharded grid cost: tasks run (by kind) and the largest per-task memory."""

    tasks: dict[str, int] = field(default_factory=dict)
    peak_task_bytes: int = 0
    plan: GridPlan | None = None

    @property
    def total_tasks(self) -> int:
        return sum(self.tasks.values())


@dataclass
class PendingGrid:
    """A submitted grid: :meth:`result` waits for its tasks and assembles the GridStats."""

    plan: GridPlan
    n: int
    confidence: float
    shape: tuple[int, int]
    null_refs: list[tuple[tuple[int, ...], tuple[int, ...], range, Any]]
    bootstrap_refs: list[tuple[tuple[int, ...], tuple[int, ...], range, Any]]
    side_peaks: list[Any]
    report: ShardReport
    layer_refs: tuple[list[Any], list[Any]]  # reusable by another metric of the same pair

    def result(self) -> tuple[GridStats, ShardReport]:
        try:
            return self._assemble()
        except RayTaskError as err:
            self._drain()
            # Bad input found inside a task: the metric's own message, not a Ray traceback.
            if isinstance(err.cause, MetricInputError):
                raise err.cause from None
            raise

    def _drain(self) -> None:
        """Wait for the grid's other tasks and read their errors: the first error is the
        one raised, and an error object never read makes Ray print it again, unasked."""
        refs = [*self.side_peaks, *(r[-1] for r in self.null_refs + self.bootstrap_refs)]
        for ref in refs:
            try:
                ray.get(ref)
            except RayTaskError:  # the same failure in another shard; already reported
                continue

    def _assemble(self) -> tuple[GridStats, ShardReport]:
        nx, ny = self.shape
        value = np.full((nx, ny), np.nan)
        n_perm = sum(len(r) for r in self.plan.permutation_shards)
        n_boot = sum(len(r) for r in self.plan.bootstrap_shards)
        nulls = np.empty((n_perm, nx, ny))
        reps = np.empty((n_boot, nx, ny))
        peaks = list(ray.get(self.side_peaks))
        for bx, by, shard, ref in self.null_refs:
            v, part, peak = ray.get(ref)
            peaks.append(peak)
            if v is not None:
                value[np.ix_(bx, by)] = v
            nulls[np.ix_(shard, bx, by)] = part
        for bx, by, shard, ref in self.bootstrap_refs:
            part, peak = ray.get(ref)
            peaks.append(peak)
            reps[np.ix_(shard, bx, by)] = part
        self.report.peak_task_bytes = max(peaks, default=0)
        return summarise(value, reps, nulls, self.confidence, self.n), self.report


def _layer_refs(
    source: LayerSource, blocks: tuple[tuple[int, ...], ...], options: dict, report: ShardReport
) -> list[Any]:
    """One object-store reference per layer: read by one task per block (none for arrays
    already in the store)."""
    if isinstance(source, ArrayLayers):
        return list(source.refs)
    read = ray.remote(_read_block)
    refs: list[Any] = []
    for block in blocks:
        got = read.options(num_returns=len(block), **options).remote(source, block)
        refs += [got] if len(block) == 1 else list(got)
    report.tasks["read"] = report.tasks.get("read", 0) + len(blocks)
    return refs


def cluster_workers(cpus_per_task: float, gpus_per_task: float) -> int:
    """How many tasks of this shape the cluster runs at once."""
    resources = ray.cluster_resources()
    if gpus_per_task > 0:
        return max(1, int(resources.get("GPU", 1) / gpus_per_task))
    return max(1, int(resources.get("CPU", 1) / max(cpus_per_task, 1e-9)))


def submit(
    source_x: LayerSource,
    source_y: LayerSource,
    metric: str,
    *,
    n_bootstrap: int = 0,
    n_permutations: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    memory_per_task: int = DEFAULT_MEMORY_PER_TASK,
    cpus_per_task: float = 1.0,
    gpus_per_task: float = 0.0,
    workers: int | None = None,
    layer_refs: tuple[list[Any], list[Any]] | None = None,
    **kw: Any,
) -> PendingGrid:
    """Submit the tasks of one metric's grid over two layer sources; see the module docstring.

    Options are checked here, before any task starts; what only the data can tell (NaN
    values, constant layers) is found by the tasks and raised by :meth:`PendingGrid.result`
    as the metric's own ``MetricInputError``. ``layer_refs`` reuses layers already loaded for
    another metric of the same pair. ``workers`` defaults to the cluster's CPUs (GPUs when
    ``gpus_per_task``) divided by one task's share.
    """
    check_count("n_bootstrap", n_bootstrap)
    check_count("n_permutations", n_permutations)
    check_count("seed", seed)
    confidence = check_confidence(confidence)
    impl = get_metric(metric)
    opts = impl.options(kw)
    n = source_x.n
    if source_y.n != n:
        raise MetricInputError(
            f"{source_y.labels[0]}: {source_y.n} rows, but {source_x.labels[0]} has {n}; the "
            "two sides must hold the same items in the same order"
        )
    check_rows(impl, opts, n, source_x.labels[0])
    device = "cuda" if gpus_per_task > 0 else "cpu"
    dtype = resolve_dtype(None, torch.device(device), n)
    widths_x, widths_y = list(source_x.widths), list(source_y.widths)
    opts = impl.plan(widths_x, widths_y, opts, Context(metric, torch.device(device), dtype, n))
    if workers is None:
        workers = cluster_workers(cpus_per_task, gpus_per_task)
    plan = plan_grid(
        n,
        widths_x,
        widths_y,
        metric,
        opts,
        n_bootstrap=n_bootstrap,
        n_permutations=n_permutations,
        memory_per_task=memory_per_task,
        workers=max(1, workers),
        itemsize=dtype.itemsize,
        labels_x=source_x.labels,
        labels_y=source_y.labels,
    )
    report = ShardReport(plan=plan)
    resources = {"num_cpus": cpus_per_task, "num_gpus": gpus_per_task, "max_retries": MAX_RETRIES}
    if layer_refs is None:
        layer_refs = (
            _layer_refs(source_x, plan.blocks_x, resources, report),
            _layer_refs(source_y, plan.blocks_y, resources, report),
        )
    xs, ys = layer_refs
    dtype_name = str(dtype).removeprefix("torch.")
    scratch = scratch_bytes(memory_per_task)
    # Each block's precomputation once, shared by every block pair it is part of.
    side_task = ray.remote(_side_of_block).options(num_returns=2, **resources)
    sides: dict[tuple[str, tuple[int, ...]], Any] = {}
    side_peaks = []
    for axis, blocks, refs, labels in (
        ("x", plan.blocks_x, xs, source_x.labels),
        ("y", plan.blocks_y, ys, source_y.labels),
    ):
        for b in blocks:
            side, peak = side_task.remote(
                metric,
                opts,
                tuple(labels[i] for i in b),
                device,
                dtype_name,
                cpus_per_task,
                scratch,
                *(refs[i] for i in b),
            )
            sides[axis, b] = side
            side_peaks.append(peak)
    report.tasks["side"] = len(side_peaks)
    null_task = ray.remote(_null_block).options(**resources)
    boot_task = ray.remote(_bootstrap_block).options(**resources)
    null_refs, boot_refs = [], []
    for bx in plan.blocks_x:
        for by in plan.blocks_y:

            def block(indices: range) -> _Block:
                return _Block(
                    metric,
                    opts,
                    tuple(source_x.labels[i] for i in bx),  # noqa: B023
                    tuple(source_y.labels[j] for j in by),  # noqa: B023
                    device,
                    dtype_name,
                    seed,
                    indices,
                    cpus_per_task,
                    scratch,
                )

            arrays = [xs[i] for i in bx] + [ys[j] for j in by]
            for s, shard in enumerate(plan.permutation_shards):
                ref = null_task.remote(
                    block(shard), s == 0, sides["x", bx], sides["y", by], *arrays
                )
                null_refs.append((bx, by, shard, ref))
            for shard in plan.bootstrap_shards:
                boot_refs.append((bx, by, shard, boot_task.remote(block(shard), *arrays)))
    report.tasks["null"] = len(null_refs)
    report.tasks["bootstrap"] = len(boot_refs)
    return PendingGrid(
        plan,
        n,
        confidence,
        (len(source_x.labels), len(source_y.labels)),
        null_refs,
        boot_refs,
        side_peaks,
        report,
        (xs, ys),
    )


def grid_stats(
    source_x: LayerSource, source_y: LayerSource, metric: str, **kw: Any
) -> tuple[GridStats, ShardReport]:
    """:func:`submit` and wait: the same GridStats as ``metrics.grid_stats`` on the same
    arrays (to float rounding), and what the tasks cost."""
    return submit(source_x, source_y, metric, **kw).result()
