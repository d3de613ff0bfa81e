"""The alignment job: lake embeddings -> the five studies -> the ``alignment`` results table.

One Ray task per (dataset, vision model, language model) runs the configured studies
(``vlray.studies``) over that pair's embeddings, reading each partition once for all of them,
and commits each study's rows in one Delta transaction. The layerwise grid, the expensive
study, is sharded instead (``vlray.shards``): the driver submits its blocks of layers and
shards of resamples and permutations as many tasks, for every pair at once, and commits each
pair's grid as one transaction when all its tasks are done (never a partial grid). A study
whose inputs the dataset lacks (no trials, no perturbations, no captions or in-context words)
is reported as skipped, with the reason; a metric that cannot run on the dataset (too few
items for its k, undefined on the data) is skipped within its study, with the minimum n and
what to change, and the other metrics' scores are written; a study that fails is reported as
failed, with the error, and the other studies and pairs still commit theirs. Each outcome,
and a warning for a study run on fewer items than its documented minimum (``SMALL_N``), is
recorded in the lake's ``study_log`` table for the report.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import ray

from vlray.catalog import ModelSpec
from vlray.cluster import ensure_ray
from vlray.embeddings import EmbeddingsNotFound
from vlray.errors import UsageError
from vlray.hashing import json_hash
from vlray.items import NO_PERTURBATION
from vlray.lake import Lake, new_run_id
from vlray.options import AlignOptions
from vlray.results import alignment_table, study_log_row, study_log_table
from vlray.shards import PeakMemory
from vlray.studies import STUDIES
from vlray.studies.inputs import StudyInputs, StudySkipped

log = logging.getLogger(__name__)

__all__ = [
    "AlignOptions",
    "align_pair",
    "inputs_hash",
    "paired_items",
    "results_key",
    "run_align",
    "what_the_lake_holds",
]


def what_the_lake_holds(lake: Lake) -> dict[str, list[str]]:
    """dataset -> the models with committed unperturbed embeddings of it: what
    ``vlray align --lake L`` with no config aligns."""
    held: dict[str, list[str]] = {}
    for r in lake.manifest().to_pylist():
        if r["perturbation"] == NO_PERTURBATION and r["rows"]:
            held.setdefault(r["dataset"], []).append(r["model"])
    return held


def paired_items(lake: Lake, dataset: str, specs: list[ModelSpec], options: AlignOptions) -> int:
    """How many image-caption pairs the first (vision, language) pair of ``specs`` has on
    ``dataset`` (images without an embedded caption do not count); for a dataset without
    captions, the fewest items any of the models embedded."""
    vision = next(s for s in specs if s.modality == "vision")
    language = next(s for s in specs if s.modality == "language")
    try:
        return len(StudyInputs(lake, dataset, vision, language, options).pairing().image_ids)
    except StudySkipped:
        return min(lake.partitions(dataset, s.name)[NO_PERTURBATION]["items"] for s in specs)


def results_key(dataset: str, vision: str, language: str) -> dict[str, str]:
    """The results rows of one (dataset, vision model, language model)."""
    return {"dataset": dataset, "vision_model": vision, "language_model": language}


def inputs_hash(
    lake: Lake, dataset: str, vision: str, language: str, options: AlignOptions, study: str
) -> str:
    """What a study's scores for a pair depend on: both models' committed partitions (their
    config hashes cover model config and items) and the study's options."""
    return _inputs_hash(*_inputs(lake, dataset, vision, language), study, options)


def _inputs(lake: Lake, dataset: str, vision: str, language: str) -> tuple:
    """The lake's side of a pair's inputs hash: both models' partitions and the items."""
    return (
        lake.committed(dataset, vision),
        lake.committed(dataset, language),
        lake.items_fingerprint(dataset),
    )


def _inputs_hash(
    vision: dict, language: dict, items: str | None, study: str, options: AlignOptions
) -> str:
    return json_hash([vision, language, items, study, options.scoring(study)])


def align_pair(
    lake: Lake | str,
    dataset: str,
    vision: dict,
    language: dict,
    options: AlignOptions,
    studies: list[str],
    run_id: str,
) -> dict:
    """Run ``studies`` for one (dataset, vision, language) on ``lake`` (pinned at the
    embeddings version the scores will record) and commit each study's rows.

    Each study's summary counts the Ray tasks it fanned out itself (0 for a study that ran
    in the calling task)."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    v_spec, l_spec = ModelSpec(**vision), ModelSpec(**language)
    inputs = StudyInputs(lake, dataset, v_spec, l_spec, options)
    inputs_of_pair = _inputs(lake, dataset, v_spec.name, l_spec.name)
    pair = (dataset, v_spec.name, l_spec.name)
    summary = {
        "dataset": dataset,
        "vision_model": v_spec.name,
        "language_model": l_spec.name,
        "studies": {},
    }
    log_rows = []
    for study in studies:
        started = time.time()
        inputs.tasks = inputs.peak_task_bytes = inputs.n = 0
        inputs.skipped_metrics = {}
        digest = _inputs_hash(*inputs_of_pair, study, options)
        outcome = _run_study(inputs, study, run_id, digest)
        summary["studies"][study] = outcome
        log_rows += _log_rows(outcome, study, run_id, digest, **results_key(*pair))
        if "rows" in outcome:
            outcome["seconds"] = time.time() - started
    if log_rows:
        lake.write_study_log(
            study_log_table(log_rows), {"study": list(studies), **results_key(*pair)}, run_id
        )
    return summary


def _run_study(inputs: StudyInputs, study: str, run_id: str, inputs_hash: str) -> dict:
    """Run one study and commit its rows (recording ``inputs_hash``); its summary: rows, n,
    tasks, peak memory, the metrics it skipped and a small-n warning; or ``skipped`` /
    ``failed`` with the reason."""
    where = results_key(inputs.dataset, inputs.vision.name, inputs.language.name)
    try:
        with PeakMemory() as memory:
            rows = STUDIES[study].run(inputs, run_id)
    except (StudySkipped, EmbeddingsNotFound) as why:
        # The dataset lacks what this study reads (trials, perturbations, captions,
        # in-context words), or has too few items for every metric: not an error.
        return {"skipped": str(why), "n": inputs.n or None}
    except Exception as err:  # one study's failure must not lose the others' results
        log.exception("%s failed on %s", study, ", ".join(where.values()))
        return {"failed": f"{type(err).__name__}: {err}"}
    inputs.lake.write_results(
        alignment_table(rows),
        {"study": study, **where},
        inputs_hash,
        run_id,
    )
    n = max((r["n"] for r in rows), default=0)
    return {
        "rows": len(rows),
        "n": n,
        "tasks": inputs.tasks,
        # a sharded study's largest task, else this process's growth while it ran
        "peak_task_bytes": inputs.peak_task_bytes or memory.peak,
        "skipped_metrics": dict(inputs.skipped_metrics),
        "small_n": STUDIES[study].small_n.warning(n),
    }


def _log_rows(outcome: dict, study: str, run_id: str, inputs_hash: str, **where: str) -> list[dict]:
    """The ``study_log`` rows of one study's outcome: the study's own, a row per metric it
    skipped, and a row for its small-n warning."""
    common = {"study": study, "run_id": run_id, "inputs_hash": inputs_hash, **where}
    if "skipped" in outcome or "failed" in outcome:
        status = "skipped" if "skipped" in outcome else "failed"
        return [study_log_row(**common, status=status, reason=outcome[status], n=outcome.get("n"))]
    n = outcome["n"]
    rows = [study_log_row(**common, status="written", n=n, rows=outcome["rows"])]
    rows += [
        study_log_row(**common, status="skipped", metric=metric, reason=why, n=n)
        for metric, why in outcome["skipped_metrics"].items()
    ]
    if outcome["small_n"]:
        rows.append(study_log_row(**common, status="small_n", reason=outcome["small_n"], n=n))
    return rows


def _align_task(*args) -> dict:
    """:func:`align_pair` as the one Ray task of a pair's unsharded studies."""
    import torch

    options = args[4]
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(options.cpus_per_task)))
    return align_pair(*args)


def run_align(
    lake: Lake | str,
    datasets: list[str],
    specs: list[ModelSpec],
    options: AlignOptions,
    only_changed: bool = False,
) -> list[dict]:
    """Fan out one Ray task per (dataset, vision model, language model).

    Returns one summary per pair: ``studies`` maps each study to its rows, items and seconds,
    or to ``{"skipped": reason}`` or ``{"failed": error}``. With ``only_changed``, studies
    whose results were computed from the same inputs (embedding partitions, items and options)
    are not rerun and appear as ``{"up_to_date": True}``.
    """
    lake = Lake(lake) if isinstance(lake, str) else lake
    lake.check(write=True)
    # Every task reads the embeddings version current now, and its scores record it.
    lake = lake.pinned()
    vision = [s for s in specs if s.modality == "vision"]
    language = [s for s in specs if s.modality == "language"]
    if not vision or not language:
        raise UsageError("alignment needs at least one vision and one language model")
    # What each study's latest scores, or its latest skip, were computed from.
    stored = {}
    if only_changed:
        stored = {**lake.skipped_inputs_hashes(), **lake.results_inputs_hashes()}
    manifest: dict[tuple[str, str], dict] = {}
    for r in lake.manifest().to_pylist():
        manifest.setdefault((r["dataset"], r["model"]), {})[r["perturbation"]] = r["config_hash"]
    jobs, done = [], []
    for ds in datasets:
        items = lake.items_fingerprint(ds) if only_changed else None
        for v in vision:
            for t in language:
                key = results_key(ds, v.name, t.name)
                wanted = [
                    s
                    for s in options.studies
                    if all(s in options.model_studies.get(m.name, (s,)) for m in (v, t))
                ]
                if not wanted:
                    continue
                todo = [
                    s
                    for s in wanted
                    if not only_changed
                    or stored.get((s, ds, v.name, t.name))
                    != _inputs_hash(
                        manifest.get((ds, v.name), {}),
                        manifest.get((ds, t.name), {}),
                        items,
                        s,
                        options,
                    )
                ]
                fresh = {s: {"up_to_date": True} for s in wanted if s not in todo}
                if todo:
                    jobs.append((ds, v, t, todo, fresh))
                else:
                    done.append({**key, "studies": fresh})
    if not jobs:
        return done
    ensure_ray()
    gpus = options.gpus_per_task
    if gpus is None:
        gpus = 0.25 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    options = options.model_copy(update={"gpus_per_task": gpus})
    task = ray.remote(_align_task).options(num_cpus=options.cpus_per_task, num_gpus=gpus)
    run_id = new_run_id()
    from_driver = {s for s in STUDIES if STUDIES[s].submits_tasks} if options.shard else set()
    # No lock: each study's rows are one Delta commit, retried if another run's commit to the
    # same table got in first.
    in_task = [
        task.remote(lake, ds, v.model_dump(), t.model_dump(), options, in_task_studies, run_id)
        if (in_task_studies := [s for s in todo if s not in from_driver])
        else None
        for ds, v, t, todo, _ in jobs
    ]
    # The sharded studies of every pair are submitted at once (one thread per pair waits for
    # its grid's tasks), so the cluster works on all pairs' shards together.
    with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
        sharded = [
            pool.submit(
                align_pair,
                lake,
                ds,
                v.model_dump(),
                t.model_dump(),
                options,
                [s for s in todo if s in from_driver],
                run_id,
            )
            for ds, v, t, todo, _ in jobs
        ]
        driver_results = [f.result() for f in sharded]
    results = []
    for (_, _, _, todo, fresh), ref, by_driver in zip(jobs, in_task, driver_results, strict=True):
        summary = ray.get(ref) if ref is not None else by_driver
        studies = {**by_driver["studies"], **(summary["studies"] if ref is not None else {})}
        summary["studies"] = {**fresh, **{s: studies[s] for s in todo}}
        # the pair's own task, if it had studies to run, and every task the others fanned out
        summary["tasks"] = (ref is not None) + sum(s.get("tasks", 0) for s in studies.values())
        results.append(summary)
    return done + results
