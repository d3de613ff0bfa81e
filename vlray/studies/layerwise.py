"""Layerwise alignment: every (vision layer, language layer) pair, with bootstrap CIs and a
permutation null (He, Trott & Khosla 2025; the field's standard comparison).

The grid is the expensive study (layers x layers x (1 + resamples + permutations) scores), so
by default it runs as many Ray tasks (:mod:`vlray.shards`): blocks of layers read from the lake
one layer at a time, shards of resamples and permutations, each task within
``options.memory_per_task``. It then runs from the driver, which submits the tasks; with
``options.shard`` off it runs in the calling task on both whole stacks. The numbers are the
same either way, up to float rounding.
"""

from __future__ import annotations

from vlray import metrics, shards
from vlray.metrics import MetricInputError
from vlray.results import Condition, grid_rows

from .inputs import SmallN, StudyInputs, layer_labels

# Fans out its own Ray tasks: run from the driver, not inside a task (a waiting task would
# hold its GPU share while its shards queue for one).
SUBMITS_TASKS = True

SMALL_N = SmallN(
    100,
    "items",
    "with fewer, the scores of unrelated data sit well above 0 (compare the permutation null "
    "mean) and bootstrap intervals are wide",
)


def run(inputs: StudyInputs, run_id: str) -> list[dict]:
    """One row per (metric, vision layer, language layer), condition ``none`` (no part set)."""
    options = inputs.options
    where = inputs.where("layerwise", run_id)
    scoring = {
        "n_bootstrap": options.bootstrap,
        "n_permutations": options.permutations,
        "confidence": options.confidence,
        "seed": options.seed,
    }
    if not options.shard:
        v, t = inputs.pairs()

        def score(metric: str) -> list[dict]:
            stats = metrics.grid_stats(
                v.layers,
                t.layers,
                metric,
                labels_x=layer_labels(v),
                labels_y=layer_labels(t),
                **scoring,
                **options.metric_kw(metric),
            )
            return grid_rows(stats, metric=metric, condition=Condition(), **where)

        return inputs.per_metric(options.metrics, len(v.item_ids), options.bootstrap, score)
    v, t = inputs.sources()
    n = v.n
    usable = [m for m in options.metrics if inputs.metric_fits(m, n, options.bootstrap)]
    pending, layer_refs = [], None
    gpus = options.gpus_per_task or 0.0
    # The metrics' grids are submitted together: they share the cluster's workers.
    workers = max(1, shards.cluster_workers(options.cpus_per_task, gpus) // max(1, len(usable)))
    for metric in usable:
        try:
            grid = shards.submit(
                v,
                t,
                metric,
                memory_per_task=options.memory_per_task,
                cpus_per_task=options.cpus_per_task,
                gpus_per_task=gpus,
                workers=workers,
                layer_refs=layer_refs,
                **scoring,
                **options.metric_kw(metric),
            )
        except MetricInputError as err:
            inputs.metric_failed(metric, err, n, options.bootstrap)
            continue
        layer_refs = grid.layer_refs  # every metric reads the same layers once
        pending.append((metric, grid))
    rows = []
    for metric, grid in pending:
        try:
            stats, report = grid.result()
        except MetricInputError as err:  # undefined on this data: the other metrics still count
            inputs.metric_failed(metric, err, n, options.bootstrap)
            continue
        finally:
            inputs.tasks += grid.report.total_tasks
        inputs.peak_task_bytes = max(inputs.peak_task_bytes, report.peak_task_bytes)
        rows += grid_rows(stats, metric=metric, condition=Condition(), **where)
    return inputs.scored(rows)
