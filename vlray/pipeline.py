"""The extraction job: sources -> items in the lake -> every model's embeddings.

Models run one at a time (one actor pool on the cluster at once), which keeps a small machine
from starving its read and write tasks and gives each model the whole cluster on a large one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from vlray.cluster import ensure_ray
from vlray.config import RunConfig
from vlray.extract import ExtractOptions, ModelResult, extract_model, partitions_to_compute
from vlray.items import EXTRA_TABLES
from vlray.lake import Lake, new_run_id
from vlray.sources import load_source

log = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    run_id: str
    results: list[ModelResult] = field(default_factory=list)
    refused_by_source: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """A line per (dataset, model) and one closing line, for people."""
        out = []
        for r in self.results:
            if r.skipped:
                out.append(f"  {r.dataset:<12} {r.model:<28} up to date (nothing to do)")
            else:
                out.append(
                    f"  {r.dataset:<12} {r.model:<28} {r.items:>7} items  {r.rows:>9} rows"
                    f"  {r.quarantined:>4} quarantined  {r.seconds:6.1f}s"
                )
        done = [r for r in self.results if not r.skipped]
        refused = sum(self.refused_by_source.values())
        out.append(
            f"extract {self.run_id}: {len(done)} model run(s), {sum(r.rows for r in done)} rows "
            f"written, {sum(r.quarantined for r in done)} quarantined while embedding, "
            f"{refused} refused by sources, {self.seconds:.1f}s"
        )
        return out


def run_extract(
    config: RunConfig, lake: Lake | str, options: ExtractOptions | None = None
) -> ExtractSummary:
    """Write every dataset's items, then embed each one with every model that lacks it."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    options = options or config.extract.options()
    specs = config.specs()
    run_id = new_run_id()
    summary = ExtractSummary(run_id=run_id)
    started = time.time()
    # No lock: every write is a Delta transaction, and concurrent runs (on this machine or
    # others) are resolved by the table format. A run killed midway leaves only unreferenced
    # files (`vlray lake vacuum` deletes them).
    lake.check(write=True)
    _extract_all(config, lake, specs, options, run_id, summary)
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
        roots[ds.name] = ds.params.get("root")
    from vlray.models import check_weights_available

    # A model whose weights must come from the hub fails here, in one line, before any job
    # starts (not in every actor, retried by Ray, after the models before it ran).
    check_weights_available(
        spec
        for spec in specs
        if any(
            partitions_to_compute(lake, ds.name, spec, fingerprints[ds.name])
            for ds in config.datasets
        )
    )
    ensure_ray()
    for spec in specs:
        for ds in config.datasets:
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
