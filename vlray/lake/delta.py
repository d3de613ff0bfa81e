"""Delta Lake primitives over a ``Storage``: snapshots, file commits and row replacements.

The commit protocol is Delta's. Data files are written first, anywhere under the table, by
any number of tasks on any node; a single transaction then adds them to the log (and, for a
replaced partition, removes the old files in the same step). Until then nobody sees them,
and a run killed before the commit leaves only unreferenced files, which ``vacuum`` deletes.
Concurrent writers are resolved by delta-rs's optimistic concurrency: a log entry is created
only if no other writer created it first (a conditional write on object stores). When another
transaction got in first and touched what this one replaces, the transaction is retried
against the new version, so the last writer's partition wins whole: never a mix of two runs.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, Transaction

from vlray.lake.storage import LakeError, Storage, _one_line
from vlray.lake.tables import TableSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
COMMIT_ATTEMPTS = 20


def partition_path(spec: TableSpec, values: Mapping[str, Any]) -> str:
    """Hive-style directory of a partition (``dataset=shapes/model=...``), values URI-encoded
    so that '/' in a perturbation name stays one segment; DuckDB and Polars decode it."""
    return _hive((k, values[k]) for k in spec.partition_by)


def _hive(pairs) -> str:
    from urllib.parse import quote

    return "/".join(f"{k}={quote(str(v), safe='')}" for k, v in pairs)


def open_table(store: Storage, spec: TableSpec, as_of: int | _dt.datetime | None = None):
    """The table's snapshot (latest, a version, or the last version at a time); None if the
    table does not exist (or did not yet at ``as_of``)."""
    uri = store.uri_of(spec.path)
    try:
        if isinstance(as_of, int):
            return DeltaTable(uri, version=as_of, storage_options=store.options)
        table = DeltaTable(uri, storage_options=store.options)
        if isinstance(as_of, _dt.datetime):
            table.load_as_version(as_of)
        return table
    except TableNotFoundError:
        return None
    except (DeltaError, ValueError) as err:
        if isinstance(as_of, _dt.datetime) and "earliest" in str(err).lower():
            return None  # the table was created after that time
        raise LakeError(f"cannot read the table {uri}: {_one_line(err)}") from None
    except OSError as err:
        raise LakeError(f"cannot reach the lake {store.uri}: {_one_line(err)}") from None


def missing_columns(spec: TableSpec, table) -> list[str]:
    """The columns of ``spec`` that a snapshot's schema lacks: a table an earlier vlray wrote
    (read through ``spec.schema`` they would be null; ``vlray lake upgrade`` adds them)."""
    if table is None:
        return []
    have = {f.name for f in table.schema().fields}
    return [name for name in spec.schema.names if name not in have]


def snapshot_dataset(store: Storage, spec: TableSpec, table) -> pads.Dataset:
    """A pyarrow dataset of a snapshot's files, read through pyarrow's own filesystem (the
    files' partition values and statistics prune whole files before any is opened)."""
    if table is None:
        return pads.dataset(spec.schema.empty_table())
    return table.to_pyarrow_dataset(filesystem=store.subtree(spec.path), schema=spec.schema)


def equals(where: Mapping[str, Any] | None) -> pc.Expression | None:
    expr = None
    for column, value in (where or {}).items():
        if isinstance(value, list | tuple | set):
            term = pc.field(column).isin(list(value))
        elif value is None:
            term = pc.field(column).is_null()
        else:
            term = pc.field(column) == value
        expr = term if expr is None else expr & term
    return expr


def write_file(
    store: Storage,
    spec: TableSpec,
    table: pa.Table,
    partition: Mapping[str, Any],
    stem: str,
    compression: str = "snappy",
) -> AddAction:
    """Write one Parquet file of a partition under the table and return its add action
    (not yet committed: invisible to every reader until ``commit_files``)."""
    relative = f"{partition_path(spec, partition)}/part-{stem}-{uuid.uuid4().hex[:12]}.parquet"
    full = store.path(spec.path, relative)
    data = table.select(spec.file_schema.names).cast(spec.file_schema)
    try:
        if store.is_local:
            store.fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
        pq.write_table(data, full, filesystem=store.fs, compression=compression)
        size = store.fs.get_file_info(full).size
    except OSError as err:
        raise LakeError(
            f"cannot write {store.uri_of(spec.path, relative)}: {_one_line(err)}"
        ) from err
    return AddAction(
        path=relative,
        size=int(size),
        partition_values={k: str(partition[k]) for k in spec.partition_by},
        modification_time=int(time.time() * 1000),
        data_change=True,
        stats=_stats(data),
    )


def _stats(data: pa.Table) -> str:
    """Delta file statistics: row count, and min/max/null count of the flat string and
    integer columns, which let readers skip files."""
    stats: dict[str, Any] = {"numRecords": data.num_rows, "minValues": {}, "maxValues": {}}
    nulls = {}
    for name in data.column_names:
        column = data.column(name)
        nulls[name] = column.null_count
        if not (pa.types.is_string(column.type) or pa.types.is_integer(column.type)):
            continue
        if column.null_count == len(column) or len(column) == 0:
            continue
        bounds = pc.min_max(column)
        stats["minValues"][name] = bounds["min"].as_py()
        stats["maxValues"][name] = bounds["max"].as_py()
    stats["nullCount"] = nulls
    return json.dumps(stats)


def create_if_missing(store: Storage, spec: TableSpec) -> None:
    try:
        DeltaTable.create(
            store.uri_of(spec.path),
            spec.schema,
            partition_by=list(spec.partition_by) or None,
            mode="ignore",
            storage_options=store.options,
        )
    except (DeltaError, OSError) as err:
        raise LakeError(f"cannot create {store.uri_of(spec.path)}: {_one_line(err)}") from None


def _retrying(what: str, attempt: Callable[[], T]) -> T:
    """Run a commit; when a concurrent transaction conflicts, retry against the new version."""
    for n in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return attempt()
        except CommitFailedError as err:
            if n == COMMIT_ATTEMPTS:
                raise LakeError(
                    f"{what}: gave up after {n} attempts, each overtaken by a concurrent "
                    f"commit ({_one_line(err)})"
                ) from None
            log.info("%s: a concurrent commit got in first; retrying (%d)", what, n)
            time.sleep(random.uniform(0.05, 0.2) * n)
        except TableNotFoundError:
            raise
        except (DeltaError, OSError) as err:
            raise LakeError(f"{what}: {_one_line(err)}") from None
    raise AssertionError("unreachable")


def commit_files(
    store: Storage,
    spec: TableSpec,
    adds: Sequence[AddAction],
    replace: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Commit written files in one transaction and return the new version. ``replace``
    (partition column -> value or list of values) names the partitions whose current files
    the transaction removes; None appends."""
    create_if_missing(store, spec)
    filters = [
        (k, "in", [str(x) for x in v]) if isinstance(v, list | tuple) else (k, "=", str(v))
        for k, v in (replace or {}).items()
    ]
    what = f"commit to {store.uri_of(spec.path)} ({_describe(replace)})"
    token = uuid.uuid4().hex  # finds this commit's version in the history

    def attempt() -> int:
        table = DeltaTable(store.uri_of(spec.path), storage_options=store.options)
        read = table.version()
        table.create_write_transaction(
            list(adds),
            mode="overwrite" if replace is not None else "append",
            schema=spec.schema,
            partition_by=list(spec.partition_by) or None,
            partition_filters=filters or None,
            commit_properties=CommitProperties(
                custom_metadata={**dict(metadata or {}), "vlray.commit": token},
                app_transactions=_claims(spec, replace),
            ),
        )
        table.update_incremental()
        for entry in table.history(table.version() - read):
            if entry.get("vlray.commit") == token:
                return int(entry["version"])
        return table.version()

    return _retrying(what, attempt)


def _claims(spec: TableSpec, replace: Mapping[str, Any] | None) -> list[Transaction] | None:
    """One application transaction per replaced partition. delta-rs removes only the files a
    replace saw, so two writers that both saw a partition empty (its first computation)
    would both commit and leave a mix of their files; a commit whose partitions a concurrent
    commit claimed too fails instead, and is retried against the new version."""
    if replace is None:
        return None
    values = [v if isinstance(v, list | tuple) else [v] for v in replace.values()]
    version = int(time.time() * 1000)
    return [
        Transaction(f"vlray/{spec.path}/{_hive(zip(replace, combo, strict=True))}", version)
        for combo in itertools.product(*values)
    ]


def replace_rows(
    store: Storage,
    spec: TableSpec,
    rows: pa.Table,
    where: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Replace the rows matching ``where`` (any columns) by ``rows`` in one transaction;
    ``where`` None appends. For the small tables (quarantine, trials, results, manifest)."""
    rows = rows.select(spec.schema.names).cast(spec.schema)
    create_if_missing(store, spec)
    what = f"commit to {store.uri_of(spec.path)} ({_describe(where)})"

    def attempt() -> int:
        table = DeltaTable(store.uri_of(spec.path), storage_options=store.options)
        write_deltalake(
            table,
            rows,
            mode="append" if where is None else "overwrite",
            predicate=None if where is None else predicate(where),
            commit_properties=CommitProperties(custom_metadata=dict(metadata or {})),
        )
        table.update_incremental()
        return table.version()

    return _retrying(what, attempt)


def rewrite_table(
    store: Storage,
    spec: TableSpec,
    rows_of: Callable[[DeltaTable], pa.Table],
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Replace every row of an existing table, and its schema by ``spec.schema``, in one
    transaction (the upgrade that adds columns); earlier versions still read as they were.
    ``rows_of(snapshot)`` makes the new rows from the snapshot it is handed: when a concurrent
    commit gets in first, they are made again from the new version, so none of its rows is
    lost."""
    what = f"rewrite of {store.uri_of(spec.path)}"

    def attempt() -> int:
        table = DeltaTable(store.uri_of(spec.path), storage_options=store.options)
        rows = rows_of(table).select(spec.schema.names).cast(spec.schema)
        write_deltalake(
            table,
            rows,
            mode="overwrite",
            schema_mode="overwrite",
            partition_by=list(spec.partition_by) or None,
            commit_properties=CommitProperties(custom_metadata=dict(metadata or {})),
        )
        table.update_incremental()
        return table.version()

    return _retrying(what, attempt)


def _literal(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def predicate(where: Mapping[str, Any]) -> str:
    """A SQL predicate (delta-rs's dialect) for column -> value, list of values, or None."""
    terms = []
    for column, value in where.items():
        if value is None:
            terms.append(f'"{column}" IS NULL')
        elif isinstance(value, list | tuple):
            terms.append(f'"{column}" IN ({", ".join(_literal(v) for v in value)})')
        else:
            terms.append(f'"{column}" = {_literal(value)}')
    return " AND ".join(terms) or "true"


def _describe(where: Mapping[str, Any] | None) -> str:
    if not where:
        return "append"
    return ", ".join(f"{k}={v}" for k, v in where.items())
