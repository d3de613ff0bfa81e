"""DuckDB over the lake: the views of ``sql/views`` and the named queries of ``sql/``.

SQL lives in ``.sql`` files, one question each (as in dbt); ``{{ source('NAME') }}`` in a view
stands for the snapshot of the lake's Delta table NAME, handed to DuckDB as a pyarrow dataset
of exactly the files that snapshot lists (so no DuckDB extension is needed, on a local disk or
an object store, and filters on partition columns open no other partition's files).
Connections are read-only by default: only statements that read are run.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from vlray.errors import VlrayError
from vlray.lake import TABLES, Lake

SQL_DIR = Path(os.environ.get("VLRAY_SQL_DIR", Path(__file__).resolve().parents[1] / "sql"))
# One view per table of the lake (sql/views/NAME.sql).
VIEWS = tuple(TABLES)

_READ_ONLY = {"SELECT", "EXPLAIN"}
_SOURCE = re.compile(r"\{\{\s*source\('(\w+)'\)\s*\}\}")


def sql_command(lake: str, query: str) -> str:
    """``vlray sql --lake LAKE QUERY`` as a shell line (the query in double quotes when that is
    safe, as people type it): what a summary or the report prints to list the rows behind it."""
    quoted = f'"{query}"' if not re.search(r'["$`\\!]', query) else shlex.quote(query)
    return f"vlray sql --lake {shlex.quote(lake)} {quoted}"


class QueryError(VlrayError, ValueError):
    """A query that is refused or fails; the message says why."""


def connect(lake: Lake | str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the lake's views (``items``, ``embeddings``, ``quarantine``,
    ``manifest``, ``alignment``, ``trials``, ``concepts``) defined over its snapshot (the
    latest, or the one ``Lake.as_of`` names); a table not written yet is an empty view of the
    right shape."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    lake.check()
    if not lake.storage.exists():
        raise QueryError(f"no lake at {lake.uri}")
    con = duckdb.connect(":memory:")

    def source(table: str) -> str:
        name = f"_delta_{table}"
        con.register(name, lake.dataset(table))
        return name

    for view in VIEWS:
        text = (SQL_DIR / "views" / f"{view}.sql").read_text()
        try:
            con.execute(_SOURCE.sub(lambda m: source(m.group(1)), text))
        except duckdb.Error as err:
            raise QueryError(f"cannot open the lake's '{view}' table: {err}") from None
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
