"""`vlray align` over the small lake: real Ray tasks, real lake reads, the results table."""

from __future__ import annotations

import numpy as np
import pytest

from vlray.align import AlignOptions, paired_layers, run_align
from vlray.catalog import get_spec
from vlray.cli import main
from vlray.lake import Lake
from vlray.sql import connect, named_query, run_query

pytestmark = pytest.mark.timeout(420)

OPTIONS = AlignOptions(
    metrics=("mutual_knn", "cka"), bootstrap=20, permutations=20, studies=("layerwise",)
)


@pytest.fixture(scope="module")
def aligned(small_lake):
    lake, _ = small_lake
    specs = [
        get_spec(n)
        for n in ("efficientnet_lite0", "tiny_vit_random", "minilm_l6", "tiny_gpt2_random")
    ]
    return lake, run_align(lake, ["shapes"], specs, OPTIONS)


def test_pairs_follow_pair_id_and_average_captions(small_lake):
    lake, _ = small_lake
    v, t = paired_layers(
        Lake(lake), "shapes", get_spec("efficientnet_lite0"), get_spec("minilm_l6"), OPTIONS
    )
    assert len(v.item_ids) == len(t.item_ids) == 192 + 4  # exemplars + scenes, all captioned
    assert list(v.item_ids) == list(t.item_ids)  # images' pair_id is their own id
    assert [m.shape[1] for m in v.layers] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert [m.shape[1] for m in t.layers] == [384] * 7


def test_every_model_pair_gets_every_layer_pair_from_its_sharded_grid(aligned):
    lake, done = aligned
    assert len(done) == 4
    # the grid ran as many tasks (reads, sides, null and bootstrap shards), not one
    assert all(d["studies"]["layerwise"]["tasks"] > 3 for d in done)
    rows = run_query(
        connect(lake),
        """
        SELECT vision_model, language_model, metric, count(*) AS n,
               count(*) FILTER (WHERE ci_low <= value AND value <= ci_high) AS in_ci,
               count(*) FILTER (WHERE p_value IS NULL OR isnan(value)) AS missing
        FROM alignment WHERE study = 'layerwise' GROUP BY ALL""",
    ).to_pylist()
    layers = {"efficientnet_lite0": 9, "tiny_vit_random": 3, "minilm_l6": 7, "tiny_gpt2_random": 3}
    assert len(rows) == 8
    for r in rows:
        assert r["n"] == layers[r["vision_model"]] * layers[r["language_model"]]
        assert r["missing"] == 0 and r["in_ci"] == r["n"]


def test_pretrained_pair_aligns_beyond_its_null(aligned):
    lake, _ = aligned
    peak = {
        (r["vision_model"], r["language_model"], r["metric"]): r
        for r in run_query(connect(lake), named_query("layerwise_peaks")).to_pylist()
    }
    best = peak[("efficientnet_lite0", "minilm_l6", "cka")]
    assert best["value"] > best["null_mean"] + 0.1
    assert best["p_value"] <= 1 / 21 + 1e-9  # beats every one of the 20 shuffles


def test_rerun_replaces_rows_instead_of_duplicating(aligned):
    lake, _ = aligned
    before = run_query(connect(lake), "SELECT count(*) AS n FROM alignment").to_pylist()
    run_align(
        lake, ["shapes"], [get_spec("tiny_vit_random"), get_spec("tiny_gpt2_random")], OPTIONS
    )
    after = run_query(connect(lake), "SELECT count(*) AS n FROM alignment").to_pylist()
    assert after == before


def test_align_cli_from_a_config(small_lake, tmp_path, capsys):
    lake, _ = small_lake
    config = tmp_path / "align.yaml"
    config.write_text(
        "datasets: [{name: shapes, source: shapes, params: {seed: 0, n_scenes: 4,"
        " exemplars_per_concept: 8, captions_per_image: 1, sentences_per_concept: 2}}]\n"
        "models: [tiny_vit_random, tiny_gpt2_random]\n"
        "align: {metrics: [rsa], bootstrap: 0, permutations: 5, studies: [layerwise]}\n"
    )
    assert main(["align", "--config", str(config), "--lake", lake]) == 0
    out = capsys.readouterr().out
    assert "1 model pair(s), 9 scores" in out
    assert " task(s)" in out and "scores written to the alignment table by " in out
    rsa = run_query(
        connect(lake), "SELECT value, ci_low FROM alignment WHERE metric = 'rsa'"
    ).to_pylist()
    assert len(rsa) == 9 and all(r["ci_low"] is None for r in rsa)
    assert np.isfinite([r["value"] for r in rsa]).all()


def test_bad_metric_in_config_names_the_field(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "datasets: [{name: s, source: shapes}]\nmodels: [tiny_vit_random]\n"
        "align: {metrics: [cka, spectral_voodoo]}\n"
    )
    assert main(["align", "--config", str(config), "--lake", str(tmp_path / "l")]) == 2
    assert "field 'align.metrics.1': unknown metric 'spectral_voodoo'" in capsys.readouterr().err


def test_all_five_studies_run_on_the_shapes_world_through_ray(small_lake):
    """Every study on the real small lake (trials, foils, vocabulary and perturbations from
    the shapes world), through one Ray task, with the results table's conventions."""
    from vlray.studies import STUDY_NAMES
    from vlray.studies.options import ExemplarOptions

    lake, _ = small_lake
    options = AlignOptions(
        metrics=("cka",), bootstrap=5, permutations=5, exemplar=ExemplarOptions(draws=2)
    )
    (done,) = run_align(
        lake, ["shapes"], [get_spec("efficientnet_lite0"), get_spec("minilm_l6")], options
    )
    assert set(done["studies"]) == set(STUDY_NAMES)
    assert all("rows" in s for s in done["studies"].values()), done["studies"]
    rows = run_query(
        connect(lake),
        """
        SELECT study, metric, condition, count(*) AS n, max(n) AS items FROM alignment
        WHERE vision_model = 'efficientnet_lite0' AND language_model = 'minilm_l6'
        GROUP BY ALL""",
    ).to_pylist()
    by = {(r["study"], r["metric"], r["condition"]): r for r in rows}
    # 4 scenes: one trial per direction each, scored at every layer pair.
    for direction in ("text_to_image", "image_to_text"):
        assert by[("forced_choice", "accuracy", direction)] == {
            "study": "forced_choice",
            "metric": "accuracy",
            "condition": direction,
            "n": 9 * 7,
            "items": 4,
        }
    conditions = {c for s, m, c in by if s == "perturbation" and m == "cka_drop"}
    assert {"image_semantic", "image_appearance", "text_semantic", "text_appearance"} <= conditions
    assert "image_semantic/remove_object" in conditions
    assert ("exemplar", "cka", "k=8/both") in by and ("exemplar", "cka", "k=16/text") not in by
    assert by[("concept_retrieval", "p@1", "nn")]["items"] == 24  # the shapes world's concepts
    assert ("concept_retrieval", "p@10", "csls/frequency=high") in by


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_score_is_refused_naming_where_it_arose(value):
    from vlray.results import score_row

    where = dict(study="layerwise", dataset="shapes", vision_model="v", language_model="t")
    place = dict(vision_layer=2, language_layer=3, metric="cka", condition="none", n=10)
    with pytest.raises(ValueError, match=r"layerwise on shapes, v x t, layers \(2, 3\), cka"):
        score_row(**where, **place, value=value, run_id="r")
    # A non-finite statistic is only missing: it becomes null.
    row = score_row(**where, **place, value=0.5, run_id="r", ci_low=value, p_value=value)
    assert row["value"] == 0.5 and row["ci_low"] is None and row["p_value"] is None
