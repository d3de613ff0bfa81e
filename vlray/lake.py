"""The embeddings lake: layout, atomic partition commits and the manifest.

```
LAKE/items/dataset=D/part-*.parquet
LAKE/embeddings/dataset=D/model=M/perturbation=P/part-L{layer}-*.parquet
LAKE/quarantine/dataset=D/part-*.parquet
LAKE/trials/dataset=D/part-0.parquet      forced-choice trials, for sources that have them
LAKE/concepts/dataset=D/part-0.parquet    concepts with words and aliases, likewise
LAKE/results/alignment/study=S/part-*.parquet
LAKE/_manifest/*.parquet            one row per committed partition
LAKE/_lock                          held by the run writing the lake
LAKE/_staging/RUN/...               work in progress, never read by the views
```

A partition is written under ``_staging``, then moved into place, then recorded in the manifest,
so a killed run leaves nothing half-visible and a re-run never duplicates rows. ``LAKE`` is a
local path or any URI pyarrow's filesystems understand (``s3://``, ``gs://``); on object stores
the move is a copy, and the manifest is what says a partition is complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlray.items import EXTRA_TABLES, ITEMS_SCHEMA, QUARANTINE_SCHEMA

MANIFEST_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("model", pa.string()),
        ("perturbation", pa.string()),
        ("model_revision", pa.string()),
        ("config_hash", pa.string()),
        ("rows", pa.int64()),
        ("items", pa.int64()),
        ("layers", pa.int32()),
        ("layer_names", pa.string()),  # JSON list, index = the `layer` column
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("code_version", pa.string()),
        ("run_id", pa.string()),
    ]
)

log = logging.getLogger(__name__)

FINGERPRINT_KEY = b"vlray.items_fingerprint"
INPUTS_KEY = b"vlray.inputs_hash"


class LakeError(RuntimeError):
    """A lake that cannot be read or written; the message names the path."""


def partition_value(value: str) -> str:
    """Hive path segment for a value: '/' and other reserved characters URI-encoded.

    DuckDB and pyarrow both decode it back (``image_semantic%2Fremove_object``).
    """
    return quote(value, safe="")


def new_run_id() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def code_version() -> str:
    from vlray import __version__

    return __version__


def items_fingerprint(items: pa.Table) -> str:
    """Content hash of an items table: a changed dataset makes its embeddings stale.

    Rows are hashed in (item_id, modality, perturbation) order. The image bytes are hashed
    row by row rather than sorted as a column: sorting would concatenate every image into one
    Arrow array, which Arrow refuses beyond 2 GiB (a few tens of thousands of photos).
    """
    keys = [("item_id", "ascending"), ("modality", "ascending"), ("perturbation", "ascending")]
    order = pc.sort_indices(items.select([k for k, _ in keys]), sort_keys=keys)
    h = hashlib.sha256()
    for batch in items.drop_columns(["image"]).take(order).to_batches():
        for column in batch.columns:
            for buf in column.buffers():
                if buf is not None:
                    h.update(buf)
    image = items.column("image")
    for i in order.to_numpy():
        value = image[int(i)]
        data = value.as_buffer() if value.is_valid else None
        h.update(b"\0" if data is None else len(data).to_bytes(8, "little"))
        if data is not None:
            h.update(data)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ItemsFingerprint:
    """What a dataset's embeddings depend on: the whole items table (``dataset``), and each
    (modality, perturbation) partition's own rows (``partitions``), so that a changed caption
    makes only the text partition that holds it stale, not every image model's embeddings."""

    dataset: str
    partitions: dict[tuple[str, str], str]

    @classmethod
    def of(cls, items: pa.Table) -> ItemsFingerprint:
        keys = (
            items.select(["modality", "perturbation"])
            .group_by(["modality", "perturbation"])
            .aggregate([])
        )
        partitions = {}
        for modality, perturbation in zip(
            keys["modality"].to_pylist(), keys["perturbation"].to_pylist(), strict=True
        ):
            rows = items.filter(
                (pc.field("modality") == modality) & (pc.field("perturbation") == perturbation)
            )
            partitions[(modality, perturbation)] = items_fingerprint(rows)
        return cls(items_fingerprint(items), partitions)

    def perturbations(self, modality: str) -> list[str]:
        return sorted(p for m, p in self.partitions if m == modality)


@dataclass
class Lake:
    """A lake at a local path or URI."""

    uri: str

    def __post_init__(self) -> None:
        if "://" not in self.uri:
            self.uri = os.path.abspath(self.uri)
        self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        self.root = self.root.rstrip("/")

    # --- paths ------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def items_dir(self, dataset: str) -> str:
        return self.path("items", f"dataset={partition_value(dataset)}")

    def partition_dir(self, dataset: str, model: str, perturbation: str) -> str:
        return self.path(
            "embeddings",
            f"dataset={partition_value(dataset)}",
            f"model={partition_value(model)}",
            f"perturbation={partition_value(perturbation)}",
        )

    def quarantine_dir(self, dataset: str) -> str:
        return self.path("quarantine", f"dataset={partition_value(dataset)}")

    def staging_dir(self, run_id: str) -> str:
        return self.path("_staging", run_id)

    def local_path(self, path: str) -> str:
        """A path DuckDB can read: local paths as they are, others with their scheme."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return path
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{path}"

    # --- low-level file operations -----------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def list_files(self, path: str, suffix: str = ".parquet") -> list[str]:
        if not self.exists(path):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(
            i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
        )

    def write_table(self, table: pa.Table, path: str, compression: str = "snappy") -> None:
        parent = path.rsplit("/", 1)[0]
        try:
            self.fs.create_dir(parent, recursive=True)
            pq.write_table(table, path, filesystem=self.fs, compression=compression)
        except OSError as err:
            raise LakeError(f"cannot write {path}: {err}") from err

    def replace_dir(self, staged: str, final: str) -> None:
        """Move a finished directory into place, replacing what was there.

        The old directory is moved aside first and deleted last: at no point is a mix of old
        and new files visible.
        """
        trash = None
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        if self.exists(final):
            trash = self.path("_trash", uuid.uuid4().hex)
            self.fs.create_dir(trash.rsplit("/", 1)[0], recursive=True)
            self.fs.move(final, trash)
        self.fs.move(staged, final)
        if trash:
            self.fs.delete_dir(trash)

    def replace_file(self, table: pa.Table, final: str, run_id: str) -> None:
        staged = self.path("_staging", run_id, "files", uuid.uuid4().hex + ".parquet")
        self.write_table(table, staged)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        self.fs.move(staged, final)

    @contextmanager
    def writer_lock(self, run_id: str) -> Iterator[None]:
        """Hold the lake's writer lock for a run: a second run against the same lake stops at
        once with a message naming the holder, instead of interleaving commits.

        Local lakes use an exclusive create; a lock left by a dead process on this host is
        taken over. Object stores have no exclusive create, so there the check is best effort.
        """
        path = self.path("_lock")
        mine = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as err:
            raise LakeError(f"cannot write the lake {self.uri}: {err}") from None
        if not self._create_lock(path, mine):
            holder = self._read_lock(path)
            if not self._stale(holder) or not self._take_over(path, holder, mine):
                raise LakeError(
                    f"the lake {self.uri} is being written by run {holder.get('run_id')} "
                    f"(pid {holder.get('pid')} on {holder.get('host')}, since "
                    f"{holder.get('since')}); try again when it ends, or delete {path} if "
                    "that run is dead"
                )
        try:
            yield
        finally:
            if self._read_lock(path).get("run_id") == run_id:
                self.fs.delete_file(path)

    def _create_lock(self, path: str, mine: dict) -> bool:
        data = json.dumps(mine).encode()
        if isinstance(self.fs, pafs.LocalFileSystem):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.exists(path):
            return False
        with self.fs.open_output_stream(path) as f:
            f.write(data)
        return True

    def _read_lock(self, path: str) -> dict:
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read() or b"{}")
        except (FileNotFoundError, OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        """A lock whose process, on this host, no longer exists."""
        if holder.get("host") != socket.gethostname() or not holder.get("pid"):
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _take_over(self, path: str, holder: dict, mine: dict) -> bool:
        log.warning(
            "taking over the lake lock of dead run %s (pid %s)",
            holder.get("run_id"),
            holder.get("pid"),
        )
        self.fs.delete_file(path)
        if not self._create_lock(path, mine):
            return False
        if holder.get("run_id"):
            self.discard(str(holder["run_id"]))  # the dead run's half-written staging
        return True

    def discard(self, run_id: str) -> None:
        """Remove a run's staging area (after a commit, or after a failure)."""
        staging = self.staging_dir(run_id)
        if self.exists(staging):
            self.fs.delete_dir(staging)
        for folder in (self.path("_staging"), self.path("_trash")):
            if self.exists(folder) and not self.fs.get_file_info(
                pafs.FileSelector(folder, recursive=False)
            ):
                self.fs.delete_dir(folder)  # leave no empty scaffolding behind

    # --- items and quarantine ----------------------------------------------------------------
    def items_fingerprint(self, dataset: str) -> str | None:
        files = self.list_files(self.items_dir(dataset))
        if not files:
            return None
        meta = pq.read_schema(files[0], filesystem=self.fs).metadata or {}
        value = meta.get(FINGERPRINT_KEY)
        return value.decode() if value else None

    def write_items(
        self,
        dataset: str,
        items: pa.Table,
        quarantine: pa.Table,
        run_id: str,
        rows_per_file: int = 256,
    ) -> ItemsFingerprint:
        """Store a dataset's items (and the rows its source quarantined); returns their
        fingerprints.

        Items go into several part files so that readers get parallel blocks; unchanged items
        are not rewritten, so re-runs keep the lake's files as they are.
        """
        items = items.cast(ITEMS_SCHEMA)
        fingerprints = ItemsFingerprint.of(items)
        fingerprint = fingerprints.dataset
        if self.items_fingerprint(dataset) == fingerprint:
            return fingerprints
        items = items.replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()})
        staged = self.path("_staging", run_id, "items", partition_value(dataset))
        for i, start in enumerate(range(0, max(items.num_rows, 1), rows_per_file)):
            self.write_table(items.slice(start, rows_per_file), f"{staged}/part-{i:05d}.parquet")
        self.replace_file(
            quarantine.cast(QUARANTINE_SCHEMA),
            self.quarantine_dir(dataset) + "/part-source.parquet",
            run_id,
        )
        self.replace_dir(staged, self.items_dir(dataset))
        return fingerprints

    def read_items(self, dataset: str, columns: list[str] | None = None) -> pa.Table:
        files = self.list_files(self.items_dir(dataset))
        if not files:
            raise LakeError(f"no items for dataset '{dataset}' in {self.uri}")
        return pa.concat_tables(
            pq.read_table(f, filesystem=self.fs, columns=columns) for f in files
        )

    def merge_quarantine(
        self, dataset: str, model: str, rows: pa.Table, perturbations: list[str], run_id: str
    ) -> None:
        """Replace one model's quarantine rows for the perturbations just recomputed."""
        path = self.quarantine_dir(dataset) + f"/part-model-{partition_value(model)}.parquet"
        parts = [rows.cast(QUARANTINE_SCHEMA)]
        if self.exists(path):
            old = pq.read_table(path, filesystem=self.fs)
            keep = pc.invert(pc.is_in(old["perturbation"], pa.array(perturbations, pa.string())))
            parts.insert(0, old.filter(keep))
        self.replace_file(pa.concat_tables(parts), path, run_id)

    # --- a source's extra tables (trials, concepts) ------------------------------------------
    def table_file_for(self, dataset: str, name: str) -> str:
        if name not in EXTRA_TABLES:
            raise LakeError(f"unknown table '{name}' (known: {', '.join(EXTRA_TABLES)})")
        return self.path(name, f"dataset={partition_value(dataset)}", "part-0.parquet")

    def write_table_for(self, dataset: str, name: str, table: pa.Table, run_id: str) -> None:
        """Replace a dataset's ``name`` table (``vlray.items.EXTRA_TABLES``) atomically; a
        re-run with the same rows leaves the file as it is."""
        path = self.table_file_for(dataset, name)
        table = table.select(EXTRA_TABLES[name].names).cast(EXTRA_TABLES[name])
        if self.exists(path) and pq.read_table(path, filesystem=self.fs).equals(table):
            return
        self.replace_file(table, path, run_id)

    def remove_table_for(self, dataset: str, name: str) -> None:
        """Drop a dataset's ``name`` table, if its source no longer gives one."""
        path = self.table_file_for(dataset, name)
        if self.exists(path):
            self.fs.delete_file(path)

    def read_table_for(self, dataset: str, name: str) -> pa.Table:
        """A dataset's ``name`` table; empty (with its schema) if the source gave none."""
        path = self.table_file_for(dataset, name)
        if not self.exists(path):
            return EXTRA_TABLES[name].empty_table()
        return pq.read_table(path, filesystem=self.fs).cast(EXTRA_TABLES[name])

    # --- results ---------------------------------------------------------------------------
    def results_dir(self, table: str, study: str) -> str:
        return self.path("results", table, f"study={partition_value(study)}")

    def results_file(self, study: str, name: str, results_table: str = "alignment") -> str:
        return f"{self.results_dir(results_table, study)}/part-{partition_value(name)}.parquet"

    def write_results(
        self, study: str, name: str, table: pa.Table, run_id: str, inputs_hash: str
    ) -> None:
        """Replace one results file atomically: a re-run replaces its rows, never duplicates.

        ``inputs_hash`` (what the rows were computed from) travels in the file's metadata, so
        that ``refresh`` can tell stale results from current ones without recomputing them.
        """
        table = table.replace_schema_metadata({INPUTS_KEY: inputs_hash.encode()})
        self.replace_file(table, self.results_file(study, name), run_id)

    def results_inputs_hash(self, study: str, name: str) -> str | None:
        """The inputs hash a results file was computed from (None: no such file)."""
        path = self.results_file(study, name)
        if not self.exists(path):
            return None
        value = (pq.read_schema(path, filesystem=self.fs).metadata or {}).get(INPUTS_KEY)
        return value.decode() if value else None

    # --- manifest --------------------------------------------------------------------------
    def manifest(self) -> pa.Table:
        """Every committed partition, the newest record per (dataset, model, perturbation)."""
        files = self.list_files(self.path("_manifest"))
        if not files:
            return MANIFEST_SCHEMA.empty_table()
        table = pa.concat_tables(
            pq.read_table(f, filesystem=self.fs).cast(MANIFEST_SCHEMA) for f in files
        )
        table = table.sort_by([("created_at", "descending")])
        seen, keep = set(), []
        for i, key in enumerate(
            zip(*(table[c].to_pylist() for c in ("dataset", "model", "perturbation")), strict=True)
        ):
            if key not in seen:
                seen.add(key)
                keep.append(i)
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

    def commit_partition(self, staged: str, record: dict) -> None:
        """Make a staged partition visible, then record it in the manifest."""
        final = self.partition_dir(record["dataset"], record["model"], record["perturbation"])
        self.replace_dir(staged, final)
        row = {f.name: [record.get(f.name)] for f in MANIFEST_SCHEMA}
        name = f"{record['run_id']}-{uuid.uuid4().hex[:8]}.parquet"
        # Staged and moved like the partition: a run killed mid-write must not leave a
        # truncated manifest file that every later reader trips over.
        self.replace_file(
            pa.Table.from_pydict(row, schema=MANIFEST_SCHEMA),
            self.path("_manifest", name),
            record["run_id"],
        )


def manifest_record(**fields) -> dict:
    record = dict(fields)
    record.setdefault("created_at", _dt.datetime.now(_dt.UTC))
    record.setdefault("code_version", code_version())
    if isinstance(record.get("layer_names"), list):
        record["layer_names"] = json.dumps(record["layer_names"])
    return record
