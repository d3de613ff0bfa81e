"""DuckDB over the lake: the views of ``sql/views`` and the named queries of ``sql/``.

SQL lives in ``.sql`` files, one question each (as in dbt); ``{{ source('NAME') }}`` in a view
stands for the lake's Parquet files of that table. Connections are read-only by default:
only statements that read are run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from vlray.items import CONCEPTS_SCHEMA, ITEMS_SCHEMA, QUARANTINE_SCHEMA, TRIALS_SCHEMA
from vlray.lake import MANIFEST_SCHEMA, Lake
from vlray.results import ALIGNMENT_SCHEMA

SQL_DIR = Path(os.environ.get("VLRAY_SQL_DIR", Path(__file__).resolve().parents[1] / "sql"))
VIEWS = ("items", "embeddings", "quarantine", "manifest", "alignment", "trials", "concepts")

# Where each table's files sit under the lake root: (folder, pattern of fixed depth, so that
# work in progress under _staging never matches).
_FILES = {
    "items": ("items", "dataset=*/*.parquet"),
    "embeddings": ("embeddings", "dataset=*/model=*/perturbation=*/*.parquet"),
    "quarantine": ("quarantine", "dataset=*/*.parquet"),
    "manifest": ("_manifest", "*.parquet"),
    "alignment": ("results/alignment", "study=*/*.parquet"),
    "trials": ("trials", "dataset=*/*.parquet"),
    "concepts": ("concepts", "dataset=*/*.parquet"),
}

# The shape of each table when the lake has no file of it yet, so every view always exists.
_EMPTY = {
    "items": ITEMS_SCHEMA.append(pa.field("dataset", pa.string())),
    "embeddings": pa.schema(
        [
            ("item_id", pa.string()),
            ("modality", pa.string()),
            ("layer", pa.int16()),
            ("pooling", pa.string()),
            ("embedding", pa.list_(pa.float32())),
            ("dataset", pa.string()),
            ("model", pa.string()),
            ("perturbation", pa.string()),
        ]
    ),
    "quarantine": QUARANTINE_SCHEMA,
    "manifest": MANIFEST_SCHEMA,
    "alignment": ALIGNMENT_SCHEMA,
    "trials": TRIALS_SCHEMA.append(pa.field("dataset", pa.string())),
    "concepts": CONCEPTS_SCHEMA.append(pa.field("dataset", pa.string())),
}

_READ_ONLY = {"SELECT", "EXPLAIN"}
_SOURCE = re.compile(r"\{\{\s*source\('(\w+)'\)\s*\}\}")


class QueryError(ValueError):
    """A query that is refused or fails; the message says why."""


def _source(con: duckdb.DuckDBPyConnection, lake: Lake, table: str) -> str:
    folder, pattern = _FILES[table]
    if lake.list_files(lake.path(folder)):
        glob = lake.local_path(lake.path(folder, pattern)).replace("'", "''")
        hive = "false" if table in ("manifest", "alignment") else "true"  # columns in the files
        # No union_by_name: vlray writes one schema per table, and union_by_name would open
        # every file's footer at bind time, defeating partition pruning.
        return f"read_parquet('{glob}', hive_partitioning = {hive})"
    name = f"_empty_{table}"
    con.register(name, _EMPTY[table].empty_table())
    return name


def connect(lake: Lake | str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the lake's views (``items``, ``embeddings``, ``quarantine``,
    ``manifest``, ``alignment``, ``trials``, ``concepts``) defined; a table with no file yet
    is an empty view of the right shape."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    if not lake.exists(lake.root):
        raise QueryError(f"no lake at {lake.uri}")
    con = duckdb.connect(":memory:")
    for view in VIEWS:
        text = (SQL_DIR / "views" / f"{view}.sql").read_text()
        try:
            con.execute(_SOURCE.sub(lambda m: _source(con, lake, m.group(1)), text))
        except duckdb.Error as err:
            raise QueryError(f"cannot open the lake's '{view}' files: {err}") from None
    return con


def named_query(name_or_path: str) -> str:
    """The text of a named query: ``sql/NAME.sql``, or a path to any ``.sql`` file."""
    path = Path(name_or_path)
    if not path.exists():
        path = SQL_DIR / (name_or_path if name_or_path.endswith(".sql") else f"{name_or_path}.sql")
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in SQL_DIR.glob("*.sql")))
        raise QueryError(f"no query file '{name_or_path}'; named queries: {known}")
    return path.read_text()


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse statements that write files, attach databases or install extensions."""
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as err:
        raise QueryError(f"cannot parse the query: {err}") from None
    for st in statements:
        kind = st.type.name
        if kind not in _READ_ONLY:
            raise QueryError(
                f"the lake is opened read-only: a {kind} statement is refused "
                "(pass --allow-write to run statements that change files or settings)"
            )


def _typed(value: str) -> Any:
    """Query parameters come as text; numbers are passed as numbers so they compare as such."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def run_query(
    con: duckdb.DuckDBPyConnection,
    query: str,
    params: dict[str, str] | None = None,
    allow_write: bool = False,
) -> pa.Table:
    """Run a query over the lake's views and return its result as an Arrow table."""
    if not allow_write:
        check_read_only(con, query)
    params = {k: _typed(v) for k, v in (params or {}).items()}
    try:
        relation = con.sql(query, params=params or None)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as err:
        raise QueryError(str(err).splitlines()[0]) from None
