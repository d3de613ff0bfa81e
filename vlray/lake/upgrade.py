"""``vlray lake upgrade``: convert a lake of vlray 0.1's layout (plain hive-partitioned Parquet,
a ``_manifest/`` folder, a process-id ``_lock``) into Delta tables, in place, without
re-embedding anything.

The old files are read where they lie and written again as the new tables' files (same rows,
the new schemas: ``layer`` a partition column, embeddings as ``list<float32>``, the items
fingerprint and the results' inputs hash as columns instead of Parquet metadata), then
committed: one transaction per table (embeddings: one per (dataset, model), each followed by
its manifest records). Only after every commit succeeded are the old files deleted, and
``_manifest/`` last of all: while it exists, vlray refuses the lake and ``upgrade`` knows it
has work left.

Killed midway, ``upgrade`` is simply run again. Each commit carries the unit it converted in
its commit metadata (``vlray.upgrade``), so a re-run skips what is already committed and
converts the rest (a partly converted unit was never committed: its new files are
unreferenced, and ``vlray lake vacuum`` deletes them). Old files are found by their 0.1 names
(``part-00000.parquet``, ``part-L003-...parquet``, ...), which no new file has, never by being
unreferenced.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlray.items import EXTRA_TABLES, ITEMS_SCHEMA, QUARANTINE_SCHEMA
from vlray.lake import delta
from vlray.lake.fingerprints import ItemsFingerprint
from vlray.lake.lake import Lake, code_version
from vlray.lake.storage import LakeError, Storage, _one_line
from vlray.lake.tables import MANIFEST_SCHEMA, TABLES, TableSpec
from vlray.results import ALIGNMENT_SCHEMA

# What vlray 0.1 wrote in Parquet schema metadata.
FINGERPRINT_KEY = b"vlray.items_fingerprint"
INPUTS_KEY = b"vlray.inputs_hash"
# The commit metadata key naming the unit an upgrade commit converted.
UNIT_KEY = "vlray.upgrade"

OLD_MANIFEST_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("model", pa.string()),
        ("perturbation", pa.string()),
        ("model_revision", pa.string()),
        ("config_hash", pa.string()),
        ("rows", pa.int64()),
        ("items", pa.int64()),
        ("layers", pa.int32()),
        ("layer_names", pa.string()),  # a JSON list
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("code_version", pa.string()),
        ("run_id", pa.string()),
    ]
)

# The names vlray 0.1 gave its files, relative to each table's folder. New files never match
# them: write_file names them part-<stem>-<12 hex>.parquet (the stems below start with
# "upgrade" or a run id), delta-rs part-NNNNN-<uuid>-c000.snappy.parquet, and new embeddings
# files sit one folder deeper (layer=L/).
_SEG = r"([^/]+)"
OLD_FILES = {
    "items": re.compile(rf"^dataset={_SEG}/part-\d{{5}}\.parquet$"),
    "embeddings": re.compile(
        rf"^dataset={_SEG}/model={_SEG}/perturbation={_SEG}/part-L\d{{3}}-[^/]*\.parquet$"
    ),
    "quarantine": re.compile(rf"^dataset={_SEG}/part-(?:source|model-[^/]*)\.parquet$"),
    "trials": re.compile(rf"^dataset={_SEG}/part-0\.parquet$"),
    "concepts": re.compile(rf"^dataset={_SEG}/part-0\.parquet$"),
    "alignment": re.compile(rf"^study={_SEG}/part-[^/]*--[^/]*--[^/]*\.parquet$"),
}
# Left by 0.1 runs: the writer lock, staged work of killed runs, partitions being replaced.
OLD_LEFTOVERS = ("_lock", "_staging", "_trash")
OLD_MANIFEST = "_manifest"


@dataclass
class _Old:
    """The old-layout files of one table: (relative path, partition values) in name order."""

    spec: TableSpec
    files: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def full(self, store: Storage, relative: str) -> str:
        return store.path(self.spec.path, relative)

    def by_partition(self) -> dict[tuple[str, ...], list[str]]:
        out: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for relative, values in self.files:
            out[values].append(relative)
        return dict(out)


def upgrade(lake: Lake) -> Iterator[str]:
    """Convert ``lake`` from vlray 0.1's layout in place; yields a line per step for people.
    A lake already in the Delta layout is left as it is (one line says so)."""
    store = lake.storage
    store.check_reachable(write=False)
    if not store.exists():
        raise LakeError(f"no lake at {lake.uri}")
    old = {name: _list_old(store, TABLES[name]) for name in OLD_FILES}
    if not (
        store.exists(OLD_MANIFEST)
        or any(store.exists(p) for p in OLD_LEFTOVERS)
        or any(entry.files for entry in old.values())
    ):
        yield (
            f"the lake {lake.uri} is already in the current layout (Delta tables); "
            "nothing to upgrade"
        )
        return
    store.check_reachable(write=True)
    _check_no_old_writer(store)
    yield (
        f"upgrading {lake.uri} from vlray 0.1's layout to Delta tables, in place "
        "(nothing is embedded again)"
    )

    items_fps = _items_fingerprints(store, old["items"])
    yield _items(store, old["items"], items_fps)
    yield _quarantine(store, old["quarantine"])
    for name in EXTRA_TABLES:
        yield _extra(store, old[name], name)
    yield from _embeddings(store, old["embeddings"], items_fps)
    yield from _results(store, old["alignment"])

    # Every table is committed: the old files go, and _manifest/ last of all.
    deleted = 0
    for entry in old.values():
        for relative, _ in entry.files:
            _delete_file(store, entry.full(store, relative))
            deleted += 1
        if store.is_local:
            _prune_empty_dirs(store, entry)
    removed = []
    for name in (*OLD_LEFTOVERS, OLD_MANIFEST):
        if _delete_any(store, name):
            removed.append(name + ("/" if name != "_lock" else ""))
    yield (
        f"  {'cleanup':<12} deleted {deleted} old-layout file(s)"
        + (f" and {', '.join(removed)}" if removed else "")
    )
    yield (
        f"upgrade: done; {lake.uri} is Delta tables now (`vlray lake history --lake "
        f"{lake.uri}` lists the embeddings commits)"
    )


# --- finding the old files -----------------------------------------------------------------


def _list_old(store: Storage, spec: TableSpec) -> _Old:
    """The table's files with 0.1 names. A table with a Delta log and no ``_manifest/``
    beside it has none left (an upgrade deletes ``_manifest/`` after every old file), so a
    lake in the new layout is never listed file by file."""
    pattern = OLD_FILES[spec.name]
    out = _Old(spec)
    root = store.path(spec.path)
    if not store.exists(spec.path):
        return out
    if store.exists(spec.path, "_delta_log") and not store.exists(OLD_MANIFEST):
        return out
    try:
        infos = store.fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as err:
        raise LakeError(f"cannot list {store.uri_of(spec.path)}: {_one_line(err)}") from None
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(root) :].lstrip("/")
        match = pattern.match(relative)
        if match:
            out.files.append((relative, tuple(unquote(v) for v in match.groups())))
    out.files.sort()
    return out


def _read(store: Storage, path: str) -> pa.Table:
    try:
        return pq.read_table(path, filesystem=store.fs)
    except OSError as err:
        raise LakeError(f"cannot read {path}: {_one_line(err)}") from None


def _metadata(store: Storage, path: str, key: bytes) -> str | None:
    try:
        meta = pq.read_schema(path, filesystem=store.fs).metadata or {}
    except OSError as err:
        raise LakeError(f"cannot read {path}: {_one_line(err)}") from None
    value = meta.get(key)
    return value.decode() if value else None


def _check_no_old_writer(store: Storage) -> None:
    """Refuse while a vlray 0.1 run may still be writing the lake (its ``_lock`` names a live
    process on this host, or a process on another host)."""
    if not store.exists("_lock"):
        return
    try:
        with store.fs.open_input_stream(store.path("_lock")) as f:
            holder = json.loads(f.read() or b"{}")
    except (OSError, ValueError):
        holder = {}
    if holder.get("host") == socket.gethostname() and holder.get("pid"):
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return  # a dead run's lock
        except (PermissionError, ValueError):
            pass
    elif not holder:
        return  # empty or unreadable: no run holds it
    raise LakeError(
        f"the lake {store.uri} is locked by vlray 0.1 run {holder.get('run_id')} (pid "
        f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}); upgrade "
        f"once it has ended, or delete {store.uri_of('_lock')} if that run is dead"
    )


# --- what earlier (interrupted) upgrades already committed ---------------------------------


def _committed_units(store: Storage, spec: TableSpec) -> dict[str, int]:
    """unit -> the table version whose upgrade commit converted it."""
    table = delta.open_table(store, spec)
    if table is None:
        return {}
    try:
        history = table.history()
    except Exception as err:  # noqa: BLE001 - delta-rs raises several types here
        raise LakeError(f"cannot read the history of {store.uri_of(spec.path)}: {err}") from None
    return {e[UNIT_KEY]: int(e["version"]) for e in history if e.get(UNIT_KEY)}


def _meta(unit: str) -> dict[str, str]:
    return {UNIT_KEY: unit, "vlray.code_version": code_version()}


def _convert_partitioned(
    store: Storage,
    old: _Old,
    unit: str,
    read_partition,
) -> tuple[int, int, bool]:
    """Write every partition of ``old`` (``read_partition(values, files) -> [(table,
    partition)]``) as new files and commit them in one transaction that replaces those
    partitions. Returns (files written, rows, skipped because already committed)."""
    spec = old.spec
    if unit in _committed_units(store, spec):
        return 0, 0, True
    adds, rows = [], 0
    partitions = old.by_partition()
    for values, files in partitions.items():
        for i, (table, partition) in enumerate(read_partition(values, files)):
            if table.num_rows == 0:
                continue
            adds.append(delta.write_file(store, spec, table, partition, f"upgrade-{i:05d}"))
            rows += table.num_rows
    column = spec.partition_by[0]
    values = sorted({v[0] for v in partitions})
    delta.commit_files(store, spec, adds, {column: values}, _meta(unit))
    return len(adds), rows, False


def _line(name: str, text: str, skipped: bool) -> str:
    if skipped:
        text = "already converted (by an earlier, interrupted upgrade)"
    return f"  {name:<12} {text}"


# --- items, quarantine, trials, concepts ---------------------------------------------------


def _items_fingerprints(store: Storage, old: _Old) -> dict[str, str]:
    """dataset -> its items fingerprint, as 0.1 kept it in the items files' metadata (or
    computed again, for files without it)."""
    out = {}
    for (dataset,), files in old.by_partition().items():
        value = _metadata(store, old.full(store, files[0]), FINGERPRINT_KEY)
        if value is None:
            items = pa.concat_tables(
                _read(store, old.full(store, f)).cast(ITEMS_SCHEMA) for f in files
            )
            value = ItemsFingerprint.of(items).dataset
        out[dataset] = value
    return out


def _items(store: Storage, old: _Old, fingerprints: dict[str, str]) -> str:
    if not old.files:
        return _line("items", "nothing to convert", False)

    def read(values, files):
        (dataset,) = values
        for f in files:
            table = _read(store, old.full(store, f)).cast(ITEMS_SCHEMA)
            table = table.append_column(
                "items_fingerprint",
                pa.array([fingerprints[dataset]] * table.num_rows, pa.string()),
            )
            yield table, {"dataset": dataset}

    n, rows, skipped = _convert_partitioned(store, old, "items", read)
    datasets = len(old.by_partition())
    return _line(
        "items",
        f"{datasets} dataset(s): {rows} rows in {n} file(s), each row with its dataset's "
        "items fingerprint",
        skipped,
    )


def _quarantine(store: Storage, old: _Old) -> str:
    if not old.files:
        return _line("quarantine", "nothing to convert", False)

    def read(values, files):
        (dataset,) = values
        tables = [_read(store, old.full(store, f)).cast(QUARANTINE_SCHEMA) for f in files]
        yield pa.concat_tables(tables), {"dataset": dataset}

    _, rows, skipped = _convert_partitioned(store, old, "quarantine", read)
    return _line(
        "quarantine",
        f"{len(old.by_partition())} dataset(s): {rows} refused row(s) from {len(old.files)} "
        "file(s)",
        skipped,
    )


def _extra(store: Storage, old: _Old, name: str) -> str:
    if not old.files:
        return _line(name, "nothing to convert", False)

    def read(values, files):
        (dataset,) = values
        for f in files:
            yield _read(store, old.full(store, f)).cast(EXTRA_TABLES[name]), {"dataset": dataset}

    _, rows, skipped = _convert_partitioned(store, old, name, read)
    return _line(name, f"{len(old.by_partition())} dataset(s): {rows} rows", skipped)


# --- embeddings and the manifest -----------------------------------------------------------


def _old_manifest(store: Storage) -> pa.Table:
    """0.1's manifest: the newest record per (dataset, model, perturbation)."""
    folder = store.path(OLD_MANIFEST)
    if not store.exists(OLD_MANIFEST):
        return OLD_MANIFEST_SCHEMA.empty_table()
    infos = store.fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    files = sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )
    if not files:
        return OLD_MANIFEST_SCHEMA.empty_table()
    table = pa.concat_tables(_read(store, f).cast(OLD_MANIFEST_SCHEMA) for f in files)
    table = table.sort_by([("created_at", "descending")])
    keys = zip(*(table[c].to_pylist() for c in ("dataset", "model", "perturbation")), strict=True)
    seen: set[tuple] = set()
    keep = [i for i, k in enumerate(keys) if not (k in seen or seen.add(k))]
    return table.take(keep).sort_by(
        [("dataset", "ascending"), ("model", "ascending"), ("perturbation", "ascending")]
    )


_CONFIG_HASH = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})$")


def _new_record(old: dict, items_fps: dict[str, str], catalog: dict, version: int) -> dict:
    """A 0.1 manifest record in the new schema. ``config_hash`` is the model spec's
    fingerprint and that of the items it was computed from, so the items fingerprint comes
    from it (else: the dataset's); ``init`` is the catalog's if the spec is still the one
    that computed it, else unknown (null)."""
    match = _CONFIG_HASH.match(old["config_hash"] or "")
    spec = catalog.get(old["model"])
    init = spec.init if spec is not None and match and spec.fingerprint() == match[1] else None
    names = old["layer_names"]
    return {
        **old,
        "layer_names": json.loads(names) if names else None,
        "init": init,
        "items_fingerprint": match[2] if match else items_fps.get(old["dataset"]),
        "embeddings_version": version,
    }


def _embedding_tables(store: Storage, old: _Old, relative: str):
    """An old layer file as (rows, layer) per layer value it holds (one, as 0.1 wrote them)."""
    table = _read(store, old.full(store, relative))
    table = table.replace_schema_metadata(None)
    layers = pc.unique(table["layer"]).to_pylist()
    for layer in sorted(layers):
        rows = table if len(layers) == 1 else table.filter(pc.field("layer") == layer)
        yield rows.drop_columns(["layer"]), int(layer)


def _embeddings(store: Storage, old: _Old, items_fps: dict[str, str]) -> Iterator[str]:
    from vlray.catalog import load_catalog

    spec, manifest_spec = TABLES["embeddings"], TABLES["manifest"]
    records = _old_manifest(store).to_pylist()
    by_job: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        by_job[(r["dataset"], r["model"])].append(r)
    files_by_partition = old.by_partition()
    committed_partitions = {(r["dataset"], r["model"], r["perturbation"]) for r in records}
    orphans = [p for p in files_by_partition if p not in committed_partitions]
    try:
        catalog = load_catalog()
    except Exception:  # noqa: BLE001 - init is only derived when the catalog loads
        catalog = {}

    done = _committed_units(store, spec)
    done_manifest = _committed_units(store, manifest_spec)
    n_files = n_rows = n_skipped = 0
    versions = []
    for (dataset, model), job in sorted(by_job.items()):
        unit = f"embeddings:{dataset}/{model}"
        perturbations = sorted(r["perturbation"] for r in job)
        if unit in done:
            version = done[unit]
            n_skipped += 1
        else:
            adds = []
            for perturbation in perturbations:
                for i, relative in enumerate(
                    files_by_partition.get((dataset, model, perturbation), [])
                ):
                    for rows, layer in _embedding_tables(store, old, relative):
                        partition = {
                            "dataset": dataset,
                            "model": model,
                            "perturbation": perturbation,
                            "layer": layer,
                        }
                        stem = f"upgrade-L{layer:03d}-{i:05d}"
                        adds.append(delta.write_file(store, spec, rows, partition, stem))
                        n_rows += rows.num_rows
            n_files += len(adds)
            version = delta.commit_files(
                store,
                spec,
                adds,
                {"dataset": dataset, "model": model, "perturbation": perturbations},
                {**_meta(unit), "vlray.dataset": dataset, "vlray.model": model},
            )
        versions.append(version)
        if unit not in done_manifest:
            new_records = [_new_record(r, items_fps, catalog, version) for r in job]
            delta.replace_rows(
                store,
                manifest_spec,
                pa.Table.from_pylist(new_records, MANIFEST_SCHEMA),
                None,
                _meta(unit),
            )
    if not by_job and not orphans:
        yield _line("embeddings", "nothing to convert", False)
        return
    text = (
        f"{len(by_job)} (dataset, model) job(s), {len(records)} partition(s): {n_rows} rows in "
        f"{n_files} file(s)"
    )
    if versions:
        text += f", table versions {min(versions)}-{max(versions)}"
    if n_skipped:
        text += f" ({n_skipped} job(s) already converted by an earlier, interrupted upgrade)"
    yield _line("embeddings", text, False)
    yield _line(
        "manifest",
        f"{len(records)} record(s), the newest of each partition (init from the catalog "
        "where the model's spec is unchanged)",
        False,
    )
    if orphans:
        yield _line(
            "",
            f"{len(orphans)} partition folder(s) with no manifest record (left by a killed "
            "vlray 0.1 run, never committed) are not converted; their files are deleted",
            False,
        )


# --- results -------------------------------------------------------------------------------


def _results(store: Storage, old: _Old) -> Iterator[str]:
    if not old.files:
        yield _line("alignment", "nothing to convert", False)
        return
    schema = TABLES["alignment"].schema
    unhashed = 0

    def read(values, files):
        nonlocal unhashed
        (study,) = values
        for f in files:
            path = old.full(store, f)
            inputs_hash = _metadata(store, path, INPUTS_KEY)
            unhashed += inputs_hash is None
            table = _read(store, path).replace_schema_metadata(None).cast(ALIGNMENT_SCHEMA)
            n = table.num_rows
            table = table.append_column("inputs_hash", pa.array([inputs_hash] * n, pa.string()))
            table = table.append_column("embeddings_version", pa.nulls(n, pa.int64()))
            yield table.cast(schema), {"study": study}

    _, rows, skipped = _convert_partitioned(store, old, "alignment", read)
    yield _line(
        "alignment",
        f"{len(old.by_partition())} stud(ies): {rows} score rows from {len(old.files)} file(s)",
        skipped,
    )
    if not skipped:
        yield _line(
            "",
            "embeddings_version left null: which embeddings 0.1's scores were computed from "
            "is unknown\n               (their inputs hash still lets `vlray refresh` tell "
            "current scores from stale ones)",
            False,
        )
    if unhashed:
        text = f"{unhashed} results file(s) had no inputs hash: `vlray refresh` recomputes them"
        yield _line("", text, False)


# --- deleting ------------------------------------------------------------------------------


def _delete_file(store: Storage, path: str) -> None:
    try:
        store.fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise LakeError(f"cannot delete {path}: {_one_line(err)}") from None


def _delete_any(store: Storage, name: str) -> bool:
    """Delete a file or folder under the lake root; False if there was none."""
    path = store.path(name)
    try:
        info = store.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return False
        if info.type == pafs.FileType.Directory:
            store.fs.delete_dir(path)
        else:
            store.fs.delete_file(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise LakeError(f"cannot delete {path}: {_one_line(err)}") from None
    return True


def _prune_empty_dirs(store: Storage, old: _Old) -> None:
    """Remove the local folders the deleted files leave empty (object stores have none)."""
    dirs = set()
    for relative, _ in old.files:
        parts = relative.split("/")[:-1]
        for n in range(len(parts), 0, -1):
            dirs.add("/".join(parts[:n]))
    for relative in sorted(dirs, key=lambda d: -d.count("/")):
        path = old.full(store, relative)
        try:
            if not os.listdir(path):
                os.rmdir(path)
        except OSError:
            pass
