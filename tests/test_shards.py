"""The layerwise grid split into Ray tasks (vlray.shards) gives the numbers of one task.

Every metric with its bootstrap interval and permutation null, cut into one-layer blocks and
several shards of resamples and permutations, equals ``metrics.grid_stats`` on the same arrays
to 1e-9 (float64); a task whose worker is killed is retried by Ray; a grid whose embeddings
are several times the memory budget completes with every task under it, as measured by the
kernel; and the layerwise study over a lake scores the same sharded and in one task.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vlray import metrics, shards
from vlray.metrics import MetricInputError

pytestmark = pytest.mark.timeout(300)

FIELDS = ("value", "ci_low", "ci_high", "null_mean", "null_sd", "p_value")
# A score's row: the GridStats fields and the null-calibrated scores made of them.
ROW_FIELDS = (*FIELDS, "calibrated", "z_score")


def _layers(n: int, widths: list[int], seed: int, shared: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        shared @ rng.normal(size=(shared.shape[1], w)) * (1 + i) + rng.normal(size=(n, w))
        for i, w in enumerate(widths)
    ]


@pytest.fixture(scope="module")
def grid_arrays():
    z = np.random.default_rng(0).normal(size=(48, 4))
    return _layers(48, [6, 9, 7], 1, z), _layers(48, [5, 8, 6, 7], 2, z)


def _assert_same(got: metrics.GridStats, want: metrics.GridStats, what: str) -> None:
    for name in FIELDS:
        np.testing.assert_allclose(
            getattr(got, name), getattr(want, name), rtol=0, atol=1e-9, err_msg=f"{what} {name}"
        )


@pytest.mark.parametrize("metric", metrics.METRICS)
def test_sharded_grid_equals_one_task(ray_session, grid_arrays, metric):
    xs, ys = grid_arrays
    kw = {"n_bootstrap": 7, "n_permutations": 9, "seed": 5, "dtype": "float64"}
    want = metrics.grid_stats(xs, ys, metric, **kw)
    kw.pop("dtype")
    # The least budget, which holds the widest layer: one layer per block, 3 x 4 blocks; and
    # 12 workers: 2 shards a block.
    impl = metrics.engine.get_metric(metric)
    opts = impl.plan([6, 9, 7], [5, 8, 6, 7], impl.options({}), _ctx(metric))
    got, report = shards.grid_stats(
        shards.ArrayLayers.put(xs),
        shards.ArrayLayers.put(ys),
        metric,
        memory_per_task=shards.min_memory_per_task(48, [6, 9, 7, 5, 8, 6, 7], metric, opts),
        workers=12,
        **kw,
    )
    assert (len(report.plan.blocks_x), len(report.plan.blocks_y)) == (3, 4)
    assert len(report.plan.bootstrap_shards) > 1 and len(report.plan.permutation_shards) > 1
    assert report.tasks["null"] == 12 * len(report.plan.permutation_shards)
    assert report.tasks["side"] == 7  # each layer's precomputation once, shared by its blocks
    assert report.total_tasks == report.plan.tasks(reads=False)  # arrays: no lake reads
    _assert_same(got, want, metric)
    assert np.isfinite(got.ci_low).all() and np.isfinite(got.p_value).all()
    assert np.isfinite(got.null_sd).all()  # 9 permutations, in several shards: one spread


def _ctx(metric: str):
    import torch

    from vlray.metrics.inputs import Context

    return Context(metric, torch.device("cpu"), torch.float64, 48)


def test_bad_input_inside_a_task_is_the_metric_error(ray_session, grid_arrays):
    xs, ys = grid_arrays
    constant = [*xs[:2], np.ones_like(xs[2])]
    with pytest.raises(MetricInputError, match="layer 2"):
        shards.grid_stats(
            shards.ArrayLayers.put(constant), shards.ArrayLayers.put(ys), "cka", workers=2
        )


def test_sides_of_unequal_rows_are_refused_naming_the_layers(ray_session, grid_arrays):
    xs, ys = grid_arrays
    with pytest.raises(MetricInputError, match=r"v2: 40 rows, but v0 has 48"):
        shards.ArrayLayers.put([xs[0], xs[1], xs[2][:40]], ["v0", "v1", "v2"])
    with pytest.raises(MetricInputError, match="the two sides must hold the same items"):
        shards.submit(
            shards.ArrayLayers.put(xs), shards.ArrayLayers.put([y[:40] for y in ys]), "cka"
        )


def test_a_layer_larger_than_half_the_budget_names_the_budget_it_needs(ray_session, grid_arrays):
    xs, ys = grid_arrays
    with pytest.raises(MetricInputError, match="raise align.memory_per_task to at least"):
        shards.submit(
            shards.ArrayLayers.put(xs), shards.ArrayLayers.put(ys), "cka", memory_per_task=1000
        )


@dataclass(frozen=True)
class DyingOnce:
    """A layer source whose first load of layer 1 kills its own worker (SIGKILL), as a node
    or OOM kill would; the marker file makes the retry succeed."""

    arrays: tuple
    marker: str
    labels: tuple = ("x0", "x1", "x2")

    @property
    def n(self) -> int:
        return self.arrays[0].shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(a.shape[1] for a in self.arrays)

    def load(self, layers) -> list[np.ndarray]:
        if 1 in layers and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return [self.arrays[i] for i in layers]


def test_a_killed_task_is_retried(ray_session, grid_arrays, tmp_path):
    xs, ys = grid_arrays
    marker = tmp_path / "killed"
    got, report = shards.grid_stats(
        DyingOnce(tuple(xs), str(marker)),
        shards.ArrayLayers.put(ys),
        "mutual_knn",
        n_bootstrap=3,
        n_permutations=3,
        workers=2,
    )
    assert marker.exists(), "the task never ran into its kill"
    killed = int(marker.read_text())
    assert not Path(f"/proc/{killed}").exists() or _zombie(killed), "the worker survived"
    want = metrics.grid_stats(xs, ys, "mutual_knn", n_bootstrap=3, n_permutations=3)
    _assert_same(got, want, "after a retry")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_grid_larger_than_the_budget_completes_under_it(ray_session):
    """16 layers of 9,000 x 96 float32 (53 MiB) under a 48 MiB budget per task, as measured
    by the kernel's resident-set high-water mark in each task."""
    n, per_side, width = 9000, 8, 96
    z = np.random.default_rng(3).normal(size=(n, 8))
    xs = [a.astype(np.float32) for a in _layers(n, [width] * per_side, 4, z)]
    ys = [a.astype(np.float32) for a in _layers(n, [width] * per_side, 5, z)]
    budget = 48 << 20
    assert sum(a.nbytes for a in xs + ys) > budget
    stats, report = shards.grid_stats(
        shards.ArrayLayers.put(xs),
        shards.ArrayLayers.put(ys),
        "cka",
        n_bootstrap=1,
        n_permutations=1,
        memory_per_task=budget,
        method="features",
    )
    assert len(report.plan.blocks_x) > 1 and len(report.plan.blocks_y) > 1
    assert 0 < report.peak_task_bytes <= budget, (report.peak_task_bytes, budget)
    assert np.isfinite(stats.value).all() and stats.value.shape == (per_side, per_side)


def _layerwise(uri: str) -> dict[tuple, tuple]:
    from vlray.lake import Lake

    rows = Lake(uri).read("alignment", {"study": "layerwise"}).to_pylist()
    return {
        (r["metric"], r["vision_layer"], r["language_layer"]): tuple(r[f] for f in ROW_FIELDS)
        for r in rows
    }


def test_the_layerwise_study_scores_the_same_sharded_and_in_one_task(ray_session, tmp_path):
    """Through the lake: per-layer reads of the pairing (images with the mean of their two
    captions) give the study's own arrays, and the sharded grid its one-task scores."""
    from vlray.align import run_align
    from vlray.bench.synthetic import write_planted_lake
    from vlray.catalog import ModelSpec
    from vlray.lake import Lake
    from vlray.options import AlignOptions
    from vlray.studies.inputs import StudyInputs

    planted = write_planted_lake(
        str(tmp_path / "lake"), n=60, layers=(4, 3), widths=(12, 10), captions=2
    )
    specs = [planted.vision, planted.language]
    common = {
        "studies": ("layerwise",),
        "metrics": ("cka", "mutual_knn"),
        "bootstrap": 6,
        "permutations": 6,
        "metric_kwargs": {"mutual_knn": {"k": 5}, "cka": {"method": "gram"}},
    }
    inputs = StudyInputs(
        Lake(planted.uri),
        planted.dataset,
        ModelSpec(**planted.vision.model_dump()),
        ModelSpec(**planted.language.model_dump()),
        AlignOptions(**common),
    )
    v, t = inputs.sources()
    stack_v, stack_t = inputs.pairs()
    assert v.widths == (12,) * 4 and t.widths == (10,) * 3
    for i, layer in zip([2, 0, 3], v.load([2, 0, 3]), strict=True):
        np.testing.assert_array_equal(layer, stack_v.layers[i])
    for j, layer in enumerate(t.load(range(3))):
        np.testing.assert_array_equal(layer, stack_t.layers[j])

    (one,) = run_align(planted.uri, [planted.dataset], specs, AlignOptions(shard=False, **common))
    single = _layerwise(planted.uri)
    # A budget of about one cka layer per block: 4 x 3 blocks (mutual_knn: fewer).
    (many,) = run_align(
        planted.uri, [planted.dataset], specs, AlignOptions(memory_per_task=150_000, **common)
    )
    sharded = _layerwise(planted.uri)
    assert one["tasks"] == 1 and one["studies"]["layerwise"]["tasks"] == 0  # in the pair's task
    # cka alone: a read and a side per block, a null and a bootstrap task per block pair
    assert many["studies"]["layerwise"]["tasks"] >= 7 + 7 + 12 + 12
    assert sharded.keys() == single.keys() and len(sharded) == 2 * 4 * 3
    for key, values in single.items():
        np.testing.assert_allclose(sharded[key], values, rtol=0, atol=1e-9, err_msg=str(key))


def test_the_config_takes_the_budget_as_a_size():
    from vlray.config import ConfigError, validate_config

    base = {
        "datasets": [{"name": "shapes", "source": "shapes", "params": {}}],
        "models": ["tiny_vit_random", "tiny_gpt2_random"],
    }
    config = validate_config({**base, "align": {"memory_per_task": "512MiB"}}, "config c.yaml")
    assert config.align.memory_per_task == 512 << 20
    assert config.align.shard is True
    with pytest.raises(ConfigError, match="field 'align.memory_per_task'"):
        validate_config({**base, "align": {"memory_per_task": "lots"}}, "config c.yaml")
