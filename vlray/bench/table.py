"""Benchmark output: rows of figures printed as one aligned table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def print_rows(rows: Sequence[dict[str, Any]]) -> None:
    """Print rows of dicts as an aligned table (columns in first-seen order)."""
    if not rows:
        print("(no rows)")
        return
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
        return "" if v is None else str(v)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(_is_number(row.get(c)) for row in rows) for c in columns]
    print(
        "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(columns, widths, numeric, strict=True)
        )
    )
    for r in cells:
        print(
            "  ".join(
                v.rjust(w) if num else v.ljust(w)
                for v, w, num in zip(r, widths, numeric, strict=True)
            )
        )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
