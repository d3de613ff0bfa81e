"""`vlray bench metrics` prints grid and loop timings side by side (figures, not a timed test)."""

from __future__ import annotations

from vlray.cli import main


def test_bench_metrics_prints_both_timings_and_their_ratio(capsys):
    assert (
        main(
            [
                "bench",
                "metrics",
                "--n",
                "96",
                "--dim",
                "16",
                "--layers",
                "3",
                "--metrics",
                "mutual_knn,cka",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for word in ("mutual_knn", "cka", "grid", "loop", "speedup"):
        assert word in out
