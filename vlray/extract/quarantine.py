"""Refused rows on their way out of the stream, so that one bad item never stops a run.

Rows that stage 1 could not decode or tokenise, and rows whose embedding is not finite,
leave the embed stage as records in ``OUTPUT_SCHEMA`` with ``stage`` and ``reason`` set; the
write tasks hand them back beside their files, and the driver turns them into rows of the
lake's quarantine table.
"""

from __future__ import annotations

import pyarrow as pa

from vlray.items import quarantine_row, quarantine_table


def error_rows(ids, perts, sources, stages, reasons) -> dict[str, list]:
    """Quarantine records in the output schema: no layer, no embedding, a stage and reason."""
    return {
        "item_id": list(ids),
        "perturbation": list(perts),
        "layer": [None] * len(ids),
        "pooling": [None] * len(ids),
        "embedding": [None] * len(ids),
        "stage": list(stages),
        "reason": list(reasons),
        "source": list(sources),
    }


def non_finite_rows(pooled) -> dict[int, str]:
    """Batch rows whose embedding has NaN/inf at some layer -> reason."""
    bad: dict[int, str] = {}
    for p in pooled:
        finite = p.finite_rows()
        if finite.all():
            continue
        for r in p.rows[~finite]:
            bad.setdefault(int(r), f"non-finite embedding at layer {p.layer} ({p.pooling})")
    return bad


def quarantine_rows(refused: list[pa.Table], dataset: str, model: str, modality: str) -> pa.Table:
    """The write tasks' quarantine records of one model's job, as quarantine table rows."""
    rows = []
    for table in refused:
        for r in table.to_pylist():
            # Every row refused during this model's job carries the model's name, so that the
            # per-model bookkeeping (sql/accounting.sql) balances; a bad image therefore
            # appears once per vision model.
            rows.append(
                quarantine_row(
                    dataset=dataset,
                    item_id=r["item_id"],
                    modality=modality,
                    perturbation=r["perturbation"],
                    stage=r["stage"],
                    reason=r["reason"],
                    source=r["source"],
                    model=model,
                )
            )
    return quarantine_table(rows)
