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


def test_bench_align_prints_one_task_sharded_and_the_paper_scale_table(ray_session, capsys):
    """A small planted lake on this session's Ray (the two-node run is the multi-node test's
    machinery, exercised there): rows (a), (b) and (d), the planted peak found by each run
    that ran, and the paper-scale table from (b)'s throughput."""
    from vlray.bench.align import bench_align

    rows = bench_align(
        n=300,
        layers=(4, 4),
        widths=(16, 16),
        bootstrap=4,
        permutations=4,
        two_node=False,
        memory_per_task=64 << 20,
    )
    assert [r["run"][:3] for r in rows] == ["(a)", "(b)", "(d)"]
    ran = [r for r in rows if "wall s" in r]
    assert [r["run"][:3] for r in ran][:2] == ["(a)", "(b)"]
    for r in ran:
        assert r["planted peak found"] is True
        assert r["max |diff| vs (a)"] < 1e-9
    assert rows[0]["tasks"] == 1 and rows[1]["tasks"] > 4
    args = ["bench", "align", "--n", "300", "--layers", "4", "--dim", "16"]
    assert main([*args, "--bootstrap", "2", "--permutations", "2", "--one-node"]) == 0
    out = capsys.readouterr().out
    for word in ("(a) one task", "(b) sharded", "Paper scale", "opt_30b", "hours on 64 CPUs"):
        assert word in out
