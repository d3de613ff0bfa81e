"""The extraction job: sources -> items in the lake -> every model's embeddings.

Models run one at a time (one actor pool on the cluster at once), which keeps a small machine
from starving its read and write tasks and gives each model the whole cluster on a large one.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field

from vlray.cluster import ensure_ray
from vlray.config import RunConfig
from vlray.extract import ModelResult, extract_model, partitions_to_compute
from vlray.images import local_path
from vlray.items import EXTRA_TABLES, TOP_QUARANTINE_REASONS
from vlray.lake import Lake, new_run_id
from vlray.options import ExtractOptions
from vlray.sources import load_source
from vlray.sql import sql_command
from vlray.tables import format_table

# Reasons name the file, id, row or byte count of each bad row; these parts are masked so that
# rows refused for the same cause are counted together.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"\S*/\S*")
_HEX = re.compile(r"\b[0-9a-fA-F]{8,}\b")
_NUMBER = re.compile(r"\b\d[\d,.]*\b")
_MASK = "..."  # ASCII: the summary may go to a log with any encoding


def normalised_reason(reason: str, width: int = 72) -> str:
    """A quarantine reason without the parts that differ from row to row (quoted names, paths,
    numbers, digests), and without its detail after ``: `` when what comes before says the
    cause on its own (``missing file: /data/x.png`` -> ``missing file``)."""
    text = reason
    for pattern in (_QUOTED, _PATH, _HEX, _NUMBER):
        text = pattern.sub(_MASK, text)
    head, sep, _ = text.partition(": ")
    if sep and _MASK not in head and len(head.split()) >= 2:
        text = head  # "row 5: ..." keeps its detail: a location is not a cause
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - len(_MASK)].rstrip() + _MASK


def quarantine_reasons(lake: Lake, dataset: str) -> list[tuple[int, str]]:
    """``(items, "modality/stage: reason")`` for every normalised reason in the dataset's
    quarantine table, most items first. Items are counted once per reason, however many models
    or perturbations refused them (a bad image is quarantined once per vision model).

    Read through the lake, not ``sql/quarantine_summary.sql``: that query counts per exact
    reason, and a reason that names its file would make every group one item."""
    rows = lake.read(
        "quarantine", {"dataset": dataset}, columns=["item_id", "modality", "stage", "reason"]
    )
    items: dict[str, set[str]] = defaultdict(set)
    unnamed: dict[str, int] = defaultdict(int)  # refused rows that are no item (a trial, say)
    for r in rows.to_pylist():
        where = "/".join(x for x in (r["modality"], r["stage"]) if x)
        key = f"{where}: {normalised_reason(r['reason'] or '')}"
        if r["item_id"] is None:
            unnamed[key] += 1
        else:
            items[key].add(r["item_id"])
    counts = {key: len(items[key]) + unnamed[key] for key in items.keys() | unnamed.keys()}
    return sorted(((n, key) for key, n in counts.items()), key=lambda x: (-x[0], x[1]))


@dataclass
class ExtractSummary:
    run_id: str
    results: list[ModelResult] = field(default_factory=list)
    refused_by_source: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    lake: str = ""
    # Per dataset with rows refused or quarantined in this run: its quarantine table's reasons
    # (quarantine_reasons), so that a person sees why without writing the query.
    reasons: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """A table with a row per (dataset, model), the top quarantine reasons of each dataset
        that has any, and one closing line, for people."""
        rows = [
            {
                "dataset": r.dataset,
                "model": r.model,
                # This run's figures: a model already in the lake shows zeros, and says why.
                "items": r.items,
                "rows": r.rows,
                "quarantined": r.quarantined,
                "seconds": round(r.seconds, 1),
                "note": "up to date (nothing to do)" if r.skipped else "",
            }
            for r in self.results
        ]
        out = format_table(rows).splitlines() if rows else []
        for dataset, reasons in self.reasons.items():
            out += self._reason_lines(dataset, reasons)
        done = [r for r in self.results if not r.skipped]
        refused = sum(self.refused_by_source.values())
        out.append(
            f"extract {self.run_id}: {len(done)} model run(s), {sum(r.rows for r in done)} rows "
            f"written, {sum(r.quarantined for r in done)} quarantined while embedding, "
            f"{refused} refused by sources, {self.seconds:.1f}s"
        )
        return out

    def _reason_lines(self, dataset: str, reasons: list[tuple[int, str]]) -> list[str]:
        """The top reasons of one dataset, and the query that lists every quarantined row."""
        if not reasons:
            return []
        out = [f"quarantine of {dataset}, top reasons (items):"]
        top = reasons[:TOP_QUARANTINE_REASONS]
        out += [f"  {n:>6} {reason}" for n, reason in top]
        if len(reasons) > len(top):
            out.append(f"  {'':>6} and {len(reasons) - len(top)} more reason(s)")
        # Dataset names are [A-Za-z0-9_.-] (config.py): safe inside the quoted query.
        query = (
            f"SELECT item_id, modality, stage, reason FROM quarantine WHERE dataset = '{dataset}'"
        )
        out.append(f"  see them all: {sql_command(self.lake, query)}")
        return out


def run_extract(
    config: RunConfig, lake: Lake | str, options: ExtractOptions | None = None
) -> ExtractSummary:
    """Write every dataset's items, then embed each one with every model that lacks it."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    options = options or config.extract
    specs = config.specs()
    run_id = new_run_id()
    summary = ExtractSummary(run_id=run_id, lake=lake.uri)
    started = time.time()
    # No lock: every write is a Delta transaction, and concurrent runs (on this machine or
    # others) are resolved by the table format. A run killed midway leaves only unreferenced
    # files (`vlray lake vacuum` deletes them).
    lake.check(write=True)
    _extract_all(config, lake, specs, options, run_id, summary)
    for ds in config.datasets:
        quarantined = sum(r.quarantined for r in summary.results if r.dataset == ds.name)
        if quarantined or summary.refused_by_source.get(ds.name):
            summary.reasons[ds.name] = quarantine_reasons(lake, ds.name)
    summary.seconds = time.time() - started
    return summary


def _extract_all(
    config: RunConfig,
    lake: Lake,
    specs,
    options: ExtractOptions,
    run_id: str,
    summary: ExtractSummary,
) -> None:
    """Items first (cheap, and what the model jobs read), then one job per (model, dataset)."""
    fingerprints, roots = {}, {}
    for ds in config.datasets:
        loaded = load_source(ds.source, ds.name, ds.params)
        fingerprints[ds.name] = lake.write_items(ds.name, loaded.items, loaded.quarantine, run_id)
        for name in EXTRA_TABLES:  # trials, concepts: written when given, dropped when not
            if name in loaded.tables:
                lake.write_table_for(ds.name, name, loaded.tables[name], run_id)
            else:
                lake.remove_table_for(ds.name, name)
        summary.refused_by_source[ds.name] = loaded.quarantine.num_rows
        root = ds.params.get("root")
        # Read again by the decode tasks, whose working folder is not this process's.
        roots[ds.name] = os.path.abspath(root) if root and local_path(root) else root
    todo = {
        (spec.name, ds.name): partitions_to_compute(
            lake, ds.name, spec, fingerprints[ds.name], options
        )
        for spec in specs
        for ds in config.datasets
    }
    # Only with something to compute: a run with nothing to do (a `vlray refresh` with nothing
    # new) needs neither the hub client nor a cluster, and starting Ray was most of its time.
    if any(todo.values()):
        from vlray.models import check_weights_available

        # A model whose weights must come from the hub fails here, in one line, before any
        # job starts (not in every actor, retried by Ray, after the models before it ran).
        check_weights_available(
            spec for spec in specs if any(todo[(spec.name, ds.name)] for ds in config.datasets)
        )
        ensure_ray()
    for spec in specs:
        for ds in config.datasets:
            if not todo[(spec.name, ds.name)]:
                summary.results.append(ModelResult(ds.name, spec.name, skipped=True))
                continue
            summary.results.append(
                extract_model(
                    lake,
                    ds.name,
                    spec,
                    fingerprints[ds.name],
                    options,
                    run_id,
                    root=roots[ds.name],
                )
            )
