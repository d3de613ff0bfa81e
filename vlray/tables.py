"""The one table formatter for everything vlray prints as columns: ``vlray sql``'s table format,
``vlray models``, ``vlray lake history``, extract's per-model summary and the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

NO_ROWS = "(no rows)"


def format_table(rows: Sequence[Mapping[str, Any]] | pa.Table, max_rows: int | None = None) -> str:
    """``rows`` (dicts, columns in first-seen order, or an Arrow table) as aligned text.

    Polars' formatter without borders: a header line, then one line per row however wide (never
    a cell wrapped: a row stays one line to read, grep or split), numbers right-aligned, a
    missing value as ``null``, text cut at 120 characters; at most ``max_rows`` rows (the first
    and last ones), all when None. ``(no rows)`` when there is no column at all.
    """
    import polars as pl  # here: its import takes most of a second, and only printing needs it

    if isinstance(rows, pa.Table):
        frame = pl.from_arrow(rows) if rows.num_columns else None
    else:
        # strict=False: a column may mix types across rows (a figure in one, a note in another).
        frame = pl.DataFrame(list(rows), strict=False, infer_schema_length=None) if rows else None
    if frame is None or not frame.width:
        return NO_ROWS
    with pl.Config(
        tbl_formatting="NOTHING",
        tbl_rows=-1 if max_rows is None else max_rows,
        tbl_cols=-1,
        tbl_width_chars=-1,  # no limit: a narrow terminal wraps whole lines, not cells
        tbl_cell_numeric_alignment="RIGHT",
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
        fmt_str_lengths=120,  # quarantine reasons, paths and model ids read whole
        fmt_table_cell_list_len=4,
    ):
        text = str(frame)
    return "\n".join(line.rstrip() for line in text.splitlines())
