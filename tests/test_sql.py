"""`vlray sql`: views, named queries, read-only, output formats and partition pruning."""

from __future__ import annotations

import json
import re
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from vlray.cli import main
from vlray.lake import Lake
from vlray.sql import SQL_DIR, QueryError, connect, named_query, run_query


def test_views_exist_on_an_empty_lake(empty_lake):
    con = connect(empty_lake)
    for view in ("items", "embeddings", "quarantine", "manifest"):
        assert run_query(con, f"SELECT count(*) AS n FROM {view}").to_pylist() == [{"n": 0}]


def test_the_views_show_every_column_of_the_scores_and_trials(empty_lake):
    # A view selects its columns by name: a column the table gains must be added to it too.
    from vlray.items import TRIALS_SCHEMA
    from vlray.results import ALIGNMENT_SCHEMA

    con = connect(empty_lake)
    alignment = run_query(con, "SELECT * FROM alignment").column_names
    assert [c for c in alignment if c in ALIGNMENT_SCHEMA.names] == ALIGNMENT_SCHEMA.names
    at = alignment.index("null_mean")
    assert alignment[at : at + 4] == ["null_mean", "null_sd", "calibrated", "z_score"]
    assert alignment[alignment.index("direction") + 1] == "trial_kind"
    trials = run_query(con, "SELECT * FROM trials").column_names
    assert [c for c in trials if c in TRIALS_SCHEMA.names] == TRIALS_SCHEMA.names


def test_missing_lake_is_a_clear_error(tmp_path):
    with pytest.raises(QueryError, match="no lake at"):
        connect(str(tmp_path / "nowhere"))


def test_rows_per_model_layer(small_lake):
    lake, _ = small_lake
    rows = run_query(connect(lake), named_query("rows_per_model_layer")).to_pylist()
    eff = [r for r in rows if r["model"] == "efficientnet_lite0" and r["perturbation"] == "none"]
    assert [r["dim"] for r in eff] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert len({r["items"] for r in eff}) == 1


def test_concept_means_average_every_exemplar(small_lake):
    lake, _ = small_lake
    con = connect(lake)
    image = run_query(
        con,
        named_query("concept_means"),
        {"model": "efficientnet_lite0", "layer": 8, "pooling": "mean"},
    ).to_pylist()
    assert len(image) == 24 and {r["exemplars"] for r in image} == {8}
    text = run_query(
        con, named_query("concept_means"), {"model": "minilm_l6", "layer": 6, "pooling": "mean"}
    ).to_pylist()
    assert len(text) == 24 and {r["exemplars"] for r in text} == {2}  # sentences per concept
    # The mean really is the mean: recompute one concept by hand.
    rows = (
        run_query(
            con,
            """
        SELECT e.embedding FROM embeddings e JOIN items i USING (dataset, item_id, modality,
        perturbation) WHERE e.model = 'efficientnet_lite0' AND e.layer = 8 AND e.pooling = 'mean'
        AND i.role = 'exemplar' AND i.concept = $c AND e.perturbation = 'none'""",
            {"c": image[0]["concept"]},
        )
        .column("embedding")
        .to_pylist()
    )
    import numpy as np

    np.testing.assert_allclose(image[0]["mean_embedding"], np.mean(rows, axis=0), atol=1e-5)


def test_nearest_neighbours_are_sorted(small_lake):
    lake, _ = small_lake
    rows = run_query(
        connect(lake),
        named_query("nearest_neighbours"),
        {
            "dataset": "shapes",
            "model": "minilm_l6",
            "layer": 6,
            "pooling": "mean",
            "item_id": "ex-red-circle-000#c0",
        },
    ).to_pylist()
    assert len(rows) == 10
    cos = [r["cosine"] for r in rows]
    assert cos == sorted(cos, reverse=True) and all(-1.0001 <= c <= 1.0001 for c in cos)


@pytest.mark.parametrize(
    "statement",
    [
        "COPY (SELECT 1) TO '/tmp/vlray-should-not-exist.csv'",
        "ATTACH '/tmp/vlray-x.db' AS x",
        "INSTALL httpfs",
        "CREATE TABLE t AS SELECT 1",
        "SELECT 1; DROP VIEW items",
    ],
)
def test_read_only_refuses_writes(empty_lake, statement):
    with pytest.raises(QueryError, match="read-only"):
        run_query(connect(empty_lake), statement)


def test_cli_formats(small_lake, capsys):
    lake, _ = small_lake
    q = "SELECT model, count(*) AS n FROM manifest GROUP BY model ORDER BY model"
    assert main(["sql", "--lake", lake, "--format", "json", q]) == 0
    rows = json.loads(capsys.readouterr().out)
    models = sorted(set(Lake(lake).manifest().column("model").to_pylist()))
    assert [r["model"] for r in rows] == models and len(models) >= 4
    assert main(["sql", "--lake", lake, "--format", "csv", q]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "model,n"
    assert main(["sql", "--lake", lake, "--file", "rows_per_model_layer"]) == 0
    assert "efficientnet_lite0" in capsys.readouterr().out
    assert main(["sql", "--lake", lake, "COPY (SELECT 1) TO 'x.csv'"]) == 2
    assert "read-only" in capsys.readouterr().err


def _corrupt(lake: str, where: pc.Expression) -> int:
    """Overwrite the embeddings files of the partitions ``where`` selects; returns how many."""
    fragments = list(Lake(lake).dataset("embeddings").get_fragments(filter=where))
    for fragment in fragments:
        with fragment.filesystem.open_output_stream(fragment.path) as out:
            out.write(b"this is not parquet")
    return len(fragments)


def test_a_query_on_one_model_reads_only_that_models_files(small_lake, tmp_path):
    """Partition pruning: with another model's files (and other layers' files) corrupted, a
    query on one model's layer still runs, from the Delta log's list of files."""
    lake, _ = small_lake
    copy = str(tmp_path / "lake")
    shutil.copytree(lake, copy)
    assert _corrupt(copy, pc.field("model") == "tiny_vit_random") > 0
    assert _corrupt(copy, (pc.field("model") == "minilm_l6") & (pc.field("layer") > 0)) > 0
    con = connect(copy)
    n = run_query(
        con,
        "SELECT count(*) AS n FROM embeddings WHERE model = 'minilm_l6' AND perturbation = 'none'"
        " AND layer = 0",
    ).to_pylist()[0]["n"]
    assert n > 0
    with pytest.raises(QueryError):
        run_query(con, "SELECT count(*) FROM embeddings WHERE model = 'tiny_vit_random'")
    with pytest.raises(QueryError):
        run_query(con, "SELECT count(*) FROM embeddings WHERE model = 'minilm_l6' AND layer = 1")


def test_polars_and_duckdb_read_the_whole_embeddings_table(small_lake):
    """Other tools read the lake as it is: Polars through the Delta log (`scan_delta`), and a
    plain DuckDB glob over every Parquet file, with no schema error across layer widths."""
    import duckdb
    import polars as pl

    lake, _ = small_lake
    expected = run_query(connect(lake), "SELECT count(*) AS n FROM embeddings").to_pylist()[0]["n"]
    frame = (
        pl.scan_delta(f"{lake}/embeddings")
        .group_by("model")
        .agg(pl.len().alias("n"), pl.col("embedding").list.len().max().alias("width"))
        .collect()
    )
    assert frame["n"].sum() == expected
    assert dict(zip(frame["model"], frame["width"], strict=True))["efficientnet_lite0"] == 1280
    glob = f"{lake}/embeddings/**/*.parquet"
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true)")
    assert n.fetchall()[0][0] == expected  # a fresh lake: every file is in the current version
    scanned = pl.scan_parquet(glob, hive_partitioning=True).select(pl.len()).collect()
    assert scanned.item() == expected


def test_sql_as_of_reads_the_lake_as_it_was(small_lake, tmp_path, capsys):
    """`--as-of VERSION` shows every table as it was while that embeddings version was the
    latest: a model committed after it is in neither the embeddings nor the manifest."""
    from vlray.lake import TABLES
    from vlray.lake.delta import write_file

    lake_uri = str(tmp_path / "lake")
    shutil.copytree(small_lake[0], lake_uri)
    lake = Lake(lake_uri)
    before = lake.version()
    rows = pa.table(
        {
            "item_id": ["a", "b"],
            "modality": ["text", "text"],
            "pooling": ["mean", "mean"],
            "embedding": pa.array([[1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32())),
        }
    )
    partition = {"dataset": "shapes", "model": "late_model", "perturbation": "none", "layer": 0}
    add = write_file(lake.storage, TABLES["embeddings"], rows, partition, "late")
    record = {"dataset": "shapes", "model": "late_model", "perturbation": "none", "rows": 2}
    assert lake.commit_embeddings("shapes", "late_model", [add], [record], "late") == before + 1

    query = (
        "SELECT (SELECT count(*) FROM embeddings WHERE model = 'late_model') AS rows,"
        " (SELECT count(*) FROM manifest WHERE model = 'late_model') AS records"
    )
    for as_of, expected in ((str(before), 0), (str(before + 1), 1), (None, 1)):
        argv = ["sql", "--lake", lake_uri, "--format", "json", query]
        assert main(argv + (["--as-of", as_of] if as_of else [])) == 0
        got = json.loads(capsys.readouterr().out)[0]
        assert got == {"rows": 2 * expected, "records": expected}, (as_of, got)
    assert main(["sql", "--lake", lake_uri, "--as-of", "last week", query]) == 2
    assert "--as-of expects a version" in capsys.readouterr().err


# A value for each `$name` parameter the named queries take, as `vlray sql --param` passes it.
QUERY_PARAMS = {
    "dataset": "shapes",
    "model": "minilm_l6",
    "layer": "6",
    "pooling": "mean",
    "item_id": "ex-red-circle-000#c0",
}


@pytest.fixture(scope="module")
def full_lake(small_lake, tmp_path_factory):
    """A copy of the small lake with every study's alignment rows (the product's align_pair
    on the tiny model pair, cheap options) and rows refused by a source (a manifest with
    blank captions and a missing image), so that every named query has rows to return."""
    from vlray.align import align_pair
    from vlray.catalog import get_spec
    from vlray.options import AlignOptions, ExemplarOptions, PerturbationOptions
    from vlray.sources.manifest import load_manifest
    from vlray.studies import STUDY_NAMES

    lake, _ = small_lake
    tmp = tmp_path_factory.mktemp("full")
    copy = str(tmp / "lake")
    shutil.copytree(lake, copy)
    options = AlignOptions(
        metrics=("cka",),
        bootstrap=2,
        permutations=2,
        exemplar=ExemplarOptions(draws=1),
        perturbation=PerturbationOptions(bootstrap=0),  # 4 perturbed scenes: too few for CIs
    )
    vision, language = (get_spec(m).model_dump() for m in ("tiny_vit_random", "tiny_gpt2_random"))
    done = align_pair(copy, "shapes", vision, language, options, list(STUDY_NAMES), "run-test")
    assert all("rows" in s for s in done["studies"].values()), done["studies"]
    (tmp / "img").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp / "img" / "a.png")
    manifest = tmp / "refusals.jsonl"
    rows = [
        {"item_id": "a", "image": "img/a.png", "caption": " "},
        {"item_id": "b", "image": "img/missing.png", "caption": ""},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, refused = load_manifest(str(manifest), str(tmp), "refusals")
    Lake(copy).write_items("refusals", items, refused, "run-test")
    return copy


@pytest.mark.parametrize("name", sorted(p.stem for p in SQL_DIR.glob("*.sql")))
def test_every_named_query_runs_and_returns_rows(full_lake, name):
    """Each sql/*.sql as `vlray sql --file NAME` runs it: a query that the installed DuckDB no
    longer parses or binds fails here, not in a user's hands."""
    query = named_query(name)
    wanted = set(re.findall(r"\$([A-Za-z_]\w*)", query))
    unknown = wanted - set(QUERY_PARAMS)
    assert not unknown, f"sql/{name}.sql takes ${', $'.join(sorted(unknown))}: add to QUERY_PARAMS"
    rows = run_query(connect(full_lake), query, {k: QUERY_PARAMS[k] for k in wanted})
    assert rows.num_rows > 0, f"sql/{name}.sql returned no rows on a lake with every table"


def test_quarantine_summary_counts_each_reason(full_lake):
    rows = run_query(connect(full_lake), named_query("quarantine_summary")).to_pylist()
    assert [(r["modality"], r["stage"], r["items"]) for r in rows] == [
        ("text", "validate", 2),  # most items first
        ("image", "read", 1),
    ]
    assert rows[0]["reason"] == "empty caption" and "missing.png" in rows[1]["reason"]
    assert {r["dataset"] for r in rows} == {"refusals"}
