"""Every table vlray prints is ``vlray.tables.format_table``'s text for its rows: one formatter,
no copies (``vlray models``, ``vlray sql``, ``vlray lake history``, the benchmarks, extract's
summary)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vlray
from vlray import tables
from vlray.cli import main
from vlray.tables import NO_ROWS, format_table


@pytest.fixture
def formatted(monkeypatch) -> list[str]:
    """Every text ``format_table`` returns while the test runs, in order."""
    texts: list[str] = []
    real = tables.format_table

    def recording(rows, max_rows=None):
        texts.append(real(rows, max_rows=max_rows))
        return texts[-1]

    # The CLI imports it from vlray.tables when it prints; pipeline imports it by name.
    monkeypatch.setattr(tables, "format_table", recording)
    import vlray.pipeline

    monkeypatch.setattr(vlray.pipeline, "format_table", recording)
    return texts


def test_format_table_aligns_columns_in_first_seen_order():
    text = format_table([{"name": "a", "n": 1, "x": 2.5}, {"name": "bbb", "n": 22, "note": "z"}])
    assert text.splitlines() == [
        " name   n     x  note",
        " a      1   2.5  null",
        " bbb   22  null  z",
    ]
    assert format_table([]) == NO_ROWS
    wide = {f"column {i}": f"tiny_vit_random, {i}" for i in range(20)}  # wider than a terminal
    assert [line.split() for line in format_table([wide]).splitlines()] == [
        [word for i in range(20) for word in ("column", str(i))],
        [word for i in range(20) for word in ("tiny_vit_random,", str(i))],
    ]  # no cell wrapped


def test_models_prints_the_one_table(formatted, capsys):
    assert main(["models", "--modality", "vision"]) == 0
    assert capsys.readouterr().out == formatted[0] + "\n" and len(formatted) == 1
    assert formatted[0].split()[:6] == [
        "name",
        "modality",
        "source",
        "weights",
        "pooling",
        "imagenet_top1",
    ]


def test_sql_and_lake_history_print_the_one_table(formatted, tmp_path, capsys):
    lake = str(tmp_path / "lake")
    Path(lake).mkdir()
    query = "SELECT 1 AS a, 'x' AS b UNION ALL SELECT 22, 'yy' ORDER BY a"
    assert main(["sql", "--lake", lake, query]) == 0
    assert capsys.readouterr().out == formatted[-1] + "\n"
    assert formatted[-1].split() == ["a", "b", "1", "x", "22", "yy"]
    assert main(["lake", "history", "--lake", lake]) == 0
    assert capsys.readouterr().out == formatted[-1] + "\n" == NO_ROWS + "\n"  # no commit yet


def test_bench_prints_the_one_table(formatted, capsys):
    argv = ["bench", "metrics", "--n", "48", "--dim", "8", "--layers", "2", "--metrics", "cka"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == formatted[0] + "\n" and len(formatted) == 1


def test_extract_summary_starts_with_the_one_table(formatted):
    from vlray.pipeline import ExtractSummary, ModelResult

    results = [
        ModelResult("shapes", "tiny_vit_random", rows=30, items=10, seconds=1.234),
        ModelResult("shapes", "minilm_l6", skipped=True),
    ]
    lines = ExtractSummary(run_id="r1", results=results).lines()
    assert lines[:3] == formatted[0].splitlines() and len(formatted) == 1
    assert lines[1].split() == ["shapes", "tiny_vit_random", "10", "30", "0", "1.2"]
    assert lines[2].split()[:2] == ["shapes", "minilm_l6"]
    assert lines[2].endswith(" up to date (nothing to do)")  # this run's zeros, and why


def test_no_module_formats_a_table_of_its_own():
    """Polars' table settings and padded columns live in vlray/tables.py only."""
    root = Path(vlray.__file__).parent
    own = re.compile(r"pl\.Config\(|\.ljust\(|\.rjust\(")
    others = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "tables.py" and own.search(path.read_text())
    ]
    assert not others, others
