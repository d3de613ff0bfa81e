"""``vlray report``: read the lake's alignment results, write DIR/index.html with its figures."""

from __future__ import annotations

from pathlib import Path

from vlray.lake import Lake
from vlray.report.data import ReportData, load
from vlray.report.findings import findings
from vlray.report.html import render
from vlray.report.sections import build_sections


def write_report(lake: Lake | str | ReportData, out: str | Path) -> Path:
    """Write ``out/index.html`` plus one PNG and CSV per figure; returns the HTML's path.

    Raises ReportError (a ValueError naming the lake) when the lake has no alignment results.
    """
    data = lake if isinstance(lake, ReportData) else load(lake)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = build_sections(data, out)
    index = out / "index.html"
    index.write_text(render(data, findings(data), sections), encoding="utf-8")
    return index
