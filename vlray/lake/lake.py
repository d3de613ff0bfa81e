"""The lake: vlray's tables (``vlray.lake.tables``) and what each step writes to and reads
from them, through Delta transactions (``vlray.lake.delta``).

A ``Lake`` reads the latest snapshot, or a pinned one: ``as_of`` an embeddings table version
(every other table as it was while that version was the latest) or a time (every table as it
was then). Alignment pins the version it starts from, so that every score it writes records
the embeddings it was computed from.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake.transaction import AddAction

from vlray.items import EXTRA_TABLES, ITEMS_SCHEMA, QUARANTINE_SCHEMA
from vlray.lake import delta
from vlray.lake.fingerprints import ItemsFingerprint
from vlray.lake.storage import LakeError, Storage
from vlray.lake.tables import MANIFEST_SCHEMA, TABLES

# The tables whose columns a later vlray added and ``vlray lake upgrade`` adds to an older
# lake's (``vlray.lake.upgrade``): a lake lacking any of them is refused until upgraded.
UPGRADED_COLUMNS = ("alignment", *EXTRA_TABLES)


def new_run_id() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def code_version() -> str:
    from vlray import __version__

    return __version__


@dataclass
class Lake:
    """A lake at a local path or URI (``s3://bucket/prefix``, ``gs://...``)."""

    uri: str
    as_of: int | _dt.datetime | None = None
    storage: Storage = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.storage = Storage(self.uri)
        self.uri = self.storage.uri
        self._pin_time: _dt.datetime | None = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "as_of": self.as_of, "storage": self.storage}

    def __setstate__(self, state: dict) -> None:
        self.uri, self.as_of, self.storage = state["uri"], state["as_of"], state["storage"]
        self._pin_time = None

    # --- snapshots ---------------------------------------------------------------------------
    def _as_of(self, name: str) -> int | _dt.datetime | None:
        if self.as_of is None or isinstance(self.as_of, _dt.datetime):
            return self.as_of
        if name == "embeddings":
            return self.as_of
        if self._pin_time is None:
            self._pin_time = self._time_before_version(self.as_of + 1)
        return self._pin_time

    def _time_before_version(self, version: int) -> _dt.datetime:
        """Just before embeddings ``version`` was committed (now, if it has not been)."""
        table = delta.open_table(self.storage, TABLES["embeddings"])
        for entry in table.history() if table is not None else []:
            if entry["version"] == version:
                ms = int(entry["timestamp"]) - 1
                return _dt.datetime.fromtimestamp(ms / 1000, _dt.UTC)
        return _dt.datetime.now(_dt.UTC)

    def table(self, name: str):
        """The Delta table ``name`` at this lake's snapshot (None: no such table yet)."""
        return delta.open_table(self.storage, TABLES[name], self._as_of(name))

    def dataset(self, name: str) -> pads.Dataset:
        """A pyarrow dataset of table ``name``'s snapshot (empty, with the table's schema, if
        the table does not exist yet); filters on partition columns open no other files."""
        return delta.snapshot_dataset(self.storage, TABLES[name], self.table(name))

    def read(
        self, name: str, where: dict[str, Any] | None = None, columns: list[str] | None = None
    ) -> pa.Table:
        try:
            return self.dataset(name).to_table(filter=delta.equals(where), columns=columns)
        except OSError as err:
            raise LakeError(f"cannot read the {name} table of {self.uri}: {err}") from None

    def version(self, name: str = "embeddings") -> int | None:
        table = self.table(name)
        return None if table is None else table.version()

    def pinned(self) -> Lake:
        """This lake pinned at its current embeddings version (itself if already pinned)."""
        if self.as_of is not None:
            return self
        return Lake(self.uri, as_of=self.version())

    def check(self, write: bool = False) -> None:
        """Before any work: the store answers (and takes a write), and the lake is in this
        version's layout. Raises ``LakeError`` in one line naming the lake."""
        self.storage.check_reachable(write)
        if self.storage.exists("_manifest"):
            raise LakeError(
                f"the lake {self.uri} is in the layout of vlray 0.1 (plain Parquet, no Delta "
                f"log); convert it in place, without re-embedding: vlray lake upgrade --lake "
                f"{self.uri}"
            )
        # Results written before a score's metric and condition had typed columns would read
        # as null parts, and the report would leave those rows out without a word; trials or
        # concepts without a later column could not take a new source's rows.
        for name in UPGRADED_COLUMNS:
            missing = delta.missing_columns(TABLES[name], self.table(name))
            if missing:
                later = " (or read a snapshot from after the upgrade)" if self.as_of else ""
                raise LakeError(
                    f"the {name} table of {self.uri} was written by an earlier vlray, without "
                    f"the columns {', '.join(missing)}; add them in place, nothing recomputed: "
                    f"vlray lake upgrade --lake {self.uri}" + later
                )

    # --- items and quarantine ----------------------------------------------------------------
    def items_fingerprint(self, dataset: str) -> str | None:
        rows = self.dataset("items").head(
            1, columns=["items_fingerprint"], filter=pc.field("dataset") == dataset
        )
        return rows["items_fingerprint"][0].as_py() if rows.num_rows else None

    def write_items(
        self,
        dataset: str,
        items: pa.Table,
        quarantine: pa.Table,
        run_id: str,
        rows_per_file: int = 256,
    ) -> ItemsFingerprint:
        """Store a dataset's items and the rows its source refused; returns their fingerprints.

        Items go into several files (readers get parallel blocks), all committed in one
        transaction that replaces the dataset's partition. Unchanged items are not rewritten.
        """
        items = items.cast(ITEMS_SCHEMA)
        fingerprints = ItemsFingerprint.of(items)
        if self.items_fingerprint(dataset) == fingerprints.dataset:
            return fingerprints
        spec = TABLES["items"]
        n = items.num_rows
        items = items.append_column(
            "items_fingerprint", pa.array([fingerprints.dataset] * n, pa.string())
        )
        adds = [
            delta.write_file(
                self.storage,
                spec,
                items.slice(start, rows_per_file),
                {"dataset": dataset},
                f"{run_id}-{i:05d}",
            )
            for i, start in enumerate(range(0, n, rows_per_file))
        ]
        # The source's refusals first: a run killed between the two commits leaves the old
        # items in place, so the next run rewrites both.
        delta.replace_rows(
            self.storage,
            TABLES["quarantine"],
            quarantine.cast(QUARANTINE_SCHEMA),
            {"dataset": dataset, "model": None},
            {"vlray.run_id": run_id},
        )
        delta.commit_files(self.storage, spec, adds, {"dataset": dataset}, {"vlray.run_id": run_id})
        return fingerprints

    def read_items(self, dataset: str, columns: list[str] | None = None) -> pa.Table:
        table = self.read("items", {"dataset": dataset}, columns)
        if table.num_rows == 0:
            raise LakeError(f"no items for dataset '{dataset}' in {self.uri}")
        return table

    def item_files(self, dataset: str) -> tuple[list[str], Any]:
        """The items files of a dataset (paths relative to the returned filesystem), for
        Ray Data's reader."""
        ds = self.dataset("items")
        files = [
            f.path
            for f in ds.get_fragments(filter=pc.field("dataset") == dataset)  # type: ignore[attr-defined]
        ]
        if not files:
            raise LakeError(f"no items for dataset '{dataset}' in {self.uri}")
        return files, self.storage.subtree(TABLES["items"].path)

    def merge_quarantine(
        self, dataset: str, model: str, rows: pa.Table, perturbations: list[str], run_id: str
    ) -> None:
        """Replace one model's quarantine rows for the perturbations just recomputed."""
        delta.replace_rows(
            self.storage,
            TABLES["quarantine"],
            rows.cast(QUARANTINE_SCHEMA),
            {"dataset": dataset, "model": model, "perturbation": list(perturbations)},
            {"vlray.run_id": run_id},
        )

    # --- a source's extra tables (trials, concepts) ------------------------------------------
    def _extra(self, name: str):
        if name not in EXTRA_TABLES:
            raise LakeError(f"unknown table '{name}' (known: {', '.join(EXTRA_TABLES)})")
        return TABLES[name]

    def write_table_for(self, dataset: str, name: str, table: pa.Table, run_id: str) -> None:
        """Replace a dataset's ``name`` table (``vlray.items.EXTRA_TABLES``) in one commit; a
        re-run with the same rows commits nothing."""
        spec = self._extra(name)
        table = table.select(EXTRA_TABLES[name].names).cast(EXTRA_TABLES[name])
        if self.read_table_for(dataset, name).equals(table):
            return
        rows = table.append_column("dataset", pa.array([dataset] * table.num_rows, pa.string()))
        delta.replace_rows(self.storage, spec, rows, {"dataset": dataset}, {"vlray.run_id": run_id})

    def remove_table_for(self, dataset: str, name: str) -> None:
        """Drop a dataset's ``name`` table, if its source no longer gives one."""
        spec = self._extra(name)
        if self.read_table_for(dataset, name).num_rows:
            delta.replace_rows(self.storage, spec, spec.schema.empty_table(), {"dataset": dataset})

    def read_table_for(self, dataset: str, name: str) -> pa.Table:
        """A dataset's ``name`` table; empty (with its schema) if the source gave none."""
        self._extra(name)
        table = self.read(name, {"dataset": dataset}, columns=EXTRA_TABLES[name].names)
        return table.cast(EXTRA_TABLES[name])

    # --- embeddings and the manifest ---------------------------------------------------------
    def commit_embeddings(
        self,
        dataset: str,
        model: str,
        adds: Sequence[AddAction],
        records: list[dict],
        run_id: str,
    ) -> int:
        """Make a (dataset, model) job's files the content of its recomputed partitions (one
        per record's perturbation) in one transaction, then record them in the manifest.
        Returns the embeddings table version that holds them."""
        perturbations = [r["perturbation"] for r in records]
        version = delta.commit_files(
            self.storage,
            TABLES["embeddings"],
            adds,
            {"dataset": dataset, "model": model, "perturbation": perturbations},
            {"vlray.run_id": run_id, "vlray.dataset": dataset, "vlray.model": model},
        )
        rows = [manifest_record(**r, embeddings_version=version, run_id=run_id) for r in records]
        delta.replace_rows(
            self.storage, TABLES["manifest"], pa.Table.from_pylist(rows, MANIFEST_SCHEMA), None
        )
        return version

    def manifest(self) -> pa.Table:
        """Every committed partition, the newest record per (dataset, model, perturbation):
        that of the latest embeddings version, whose files are the ones visible (two runs'
        records may be appended in the other order than their commits)."""
        table = self.read("manifest")
        if table.num_rows == 0:
            return MANIFEST_SCHEMA.empty_table()
        table = table.sort_by([("embeddings_version", "descending"), ("created_at", "descending")])
        keys = zip(
            *(table[c].to_pylist() for c in ("dataset", "model", "perturbation")), strict=True
        )
        seen: set[tuple] = set()
        keep = [i for i, k in enumerate(keys) if not (k in seen or seen.add(k))]
        return table.take(keep).sort_by(
            [("dataset", "ascending"), ("model", "ascending"), ("perturbation", "ascending")]
        )

    def partitions(self, dataset: str, model: str) -> dict[str, dict]:
        """perturbation -> manifest record of the partitions committed for a (dataset, model)."""
        return {
            r["perturbation"]: r
            for r in self.manifest().to_pylist()
            if r["dataset"] == dataset and r["model"] == model
        }

    def committed(self, dataset: str, model: str) -> dict[str, str]:
        """perturbation -> config hash of the partitions committed for a (dataset, model)."""
        return {p: r["config_hash"] for p, r in self.partitions(dataset, model).items()}

    # --- results -----------------------------------------------------------------------------
    def write_results(
        self, rows: pa.Table, where: dict[str, str], inputs_hash: str, run_id: str
    ) -> int:
        """Replace the results rows matching ``where`` (study, dataset, vision_model,
        language_model) in one commit: a re-run replaces its rows, never duplicates them.
        Each row records the inputs hash (``refresh`` compares it) and the embeddings version
        this lake is pinned at."""
        n = rows.num_rows
        rows = rows.append_column("inputs_hash", pa.array([inputs_hash] * n, pa.string()))
        version = self.as_of if isinstance(self.as_of, int) else self.version()
        rows = rows.append_column("embeddings_version", pa.array([version] * n, pa.int64()))
        return delta.replace_rows(
            self.storage, TABLES["alignment"], rows, where, {"vlray.run_id": run_id}
        )

    def write_study_log(self, rows: pa.Table, where: dict[str, str], run_id: str) -> int:
        """Replace the ``study_log`` rows matching ``where`` (study, dataset, vision_model,
        language_model) by ``rows``, in one commit."""
        return delta.replace_rows(
            self.storage, TABLES["study_log"], rows, where, {"vlray.run_id": run_id}
        )

    def results_inputs_hashes(self) -> dict[tuple[str, str, str, str], str]:
        """(study, dataset, vision_model, language_model) -> the inputs hash of its rows."""
        keys = ["study", "dataset", "vision_model", "language_model", "inputs_hash"]
        table = self.read("alignment", columns=keys)
        if table.num_rows == 0:
            return {}
        distinct = table.group_by(keys).aggregate([])
        return {tuple(r[k] for k in keys[:4]): r["inputs_hash"] for r in distinct.to_pylist()}

    def skipped_inputs_hashes(self) -> dict[tuple[str, str, str, str], str]:
        """(study, dataset, vision_model, language_model) -> the inputs hash of a study that
        was skipped as a whole (the dataset lacks its inputs): same inputs, same skip."""
        keys = ["study", "dataset", "vision_model", "language_model", "inputs_hash"]
        table = self.read("study_log", columns=[*keys, "status", "metric"])
        return {
            tuple(r[k] for k in keys[:4]): r["inputs_hash"]
            for r in table.to_pylist()
            if r["status"] == "skipped" and r["metric"] is None and r["inputs_hash"]
        }

    # --- maintenance -------------------------------------------------------------------------
    def tables(self) -> dict[str, Any]:
        """name -> the latest Delta table, for the tables that exist."""
        out = {}
        for name, spec in TABLES.items():
            table = delta.open_table(self.storage, spec)
            if table is not None:
                out[name] = table
        return out

    def vacuum(self, retain_hours: float = 168.0, dry_run: bool = False) -> dict[str, list[str]]:
        """Delete files no table references (left by killed runs, or replaced) that are older
        than ``retain_hours``: name -> the files deleted (or, dry run, that would be)."""
        return {
            name: table.vacuum(
                retention_hours=int(retain_hours),
                dry_run=dry_run,
                enforce_retention_duration=False,
                full=True,
            )
            for name, table in self.tables().items()
        }

    def optimize(self) -> dict[str, dict]:
        """Compact each partition's small files into larger ones (one commit per table; the
        replaced files stay for time travel until ``vacuum``)."""
        return {name: table.optimize.compact() for name, table in self.tables().items()}


def manifest_record(**fields) -> dict:
    record = dict(fields)
    record.setdefault("created_at", _dt.datetime.now(_dt.UTC))
    record.setdefault("code_version", code_version())
    return record
