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


def test_bench_extract_prints_model_only_pipeline_and_naive_side_by_side(ray_session, capsys):
    """On a CPU: the three cases for one vision and one language model, with both ratios and
    no targets (those apply on a GPU); the pipeline embedded every item (else it raises)."""
    argv = ["bench", "extract", "--models", "tiny_vit_random,tiny_gpt2_random"]
    assert main([*argv, "--n", "48", "--seconds", "0.2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if "_random" in line]
    cases = [(cells[0], cells[2]) for cells in lines]
    assert cases == [
        (model, case)
        for model in ("tiny_vit_random", "tiny_gpt2_random")
        for case in ("model_only", "pipeline", "naive")
    ]
    assert "vs_model" in out and "vs_naive" in out and "none on CPU" in out
