"""`vlray align` over the small lake: real Ray tasks, real lake reads, the results table."""

from __future__ import annotations

import numpy as np
import pytest

import vlray
from vlray import metrics
from vlray.align import AlignOptions, run_align
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
    p = vlray.open_lake(lake).pairs("shapes", vision="efficientnet_lite0", language="minilm_l6")
    assert len(p) == 192 + 4  # exemplars + scenes, all captioned
    assert [m.shape[1] for m in p.vision] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert [m.shape[1] for m in p.language] == [384] * 7
    assert p.vision_layers == list(range(9)) and p.language_layer_names[0] == "embeddings"
    first = vlray.open_lake(lake).pairs(
        "shapes", vision="efficientnet_lite0", language="minilm_l6", captions="first"
    )
    assert list(first.ids) == list(p.ids)  # one caption per image here: the same rows


def test_pairs_api_gives_the_arrays_the_layerwise_study_scored(aligned):
    """`vlray.open_lake(L).pairs(...)` returns what the sharded layerwise tasks read, and
    scoring it reproduces the alignment table."""
    from vlray.studies.inputs import StudyInputs

    lake, _ = aligned
    p = vlray.open_lake(lake).pairs(
        "shapes",
        vision="efficientnet_lite0",
        language="minilm_l6",
        vision_layers=[0, 4, 8],
        language_layers=[0, 4, 6],
    )
    sources = StudyInputs(
        Lake(lake), "shapes", get_spec("efficientnet_lite0"), get_spec("minilm_l6"), OPTIONS
    ).sources()
    read = sources[0].load([0, 4, 8]), sources[1].load([0, 4, 6])
    for mine, theirs in zip(p.vision + p.language[:1], read[0] + read[1][:1], strict=True):
        np.testing.assert_array_equal(mine, theirs)
    stored = {
        (r["vision_layer"], r["language_layer"]): r["value"]
        for r in run_query(
            connect(lake),
            "SELECT vision_layer, language_layer, value FROM alignment WHERE study = 'layerwise'"
            " AND metric = 'cka' AND vision_model = 'efficientnet_lite0'"
            " AND language_model = 'minilm_l6'",
        ).to_pylist()
    }
    grid = metrics.grid(p.vision, p.language, "cka")
    for a, i in enumerate(p.vision_layers):
        for b, j in enumerate(p.language_layers):
            assert grid[a, b] == pytest.approx(stored[i, j], rel=1e-5, abs=1e-6)
    torch_pairs = vlray.open_lake(lake).pairs(
        "shapes", vision="efficientnet_lite0", language="minilm_l6", layers="last", as_="torch"
    )
    assert torch_pairs.vision[0].shape == (196, 1280) and torch_pairs.vision_layers == [8]


def test_concept_means_and_unknown_models_are_named(small_lake):
    lake = vlray.open_lake(small_lake[0])
    c = lake.concepts("shapes", vision="efficientnet_lite0", language="minilm_l6", layers="last")
    assert len(c) == len(set(c.ids)) >= 4 and c.vision[0].shape == (len(c), 1280)
    with pytest.raises(ValueError, match="no embeddings of model 'nope'.*it has: "):
        lake.pairs("shapes", vision="nope", language="minilm_l6")
    with pytest.raises(ValueError, match="has layers 0..8; asked for \\[9\\]"):
        lake.pairs("shapes", vision="efficientnet_lite0", language="minilm_l6", layers=[9])


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


def test_align_without_a_config_aligns_what_the_lake_holds(small_lake, capsys):
    """`vlray align --lake L` and flags: every vision x language pair the lake holds (here
    narrowed by --models), with the flags' options."""
    lake, _ = small_lake
    argv = ["align", "--lake", lake, "--models", "tiny_vit_random,tiny_gpt2_random,minilm_l6"]
    flags = ["--studies", "layerwise", "--metrics", "cka", "--bootstrap", "0"]
    assert main([*argv, *flags, "--permutations", "4"]) == 0
    out = capsys.readouterr().out
    assert "shapes | tiny_vit_random x tiny_gpt2_random" in out
    assert "shapes | tiny_vit_random x minilm_l6" in out
    assert "2 model pair(s), 30 scores written" in out  # 3 x 3 + 3 x 7 layer pairs
    assert main([*argv, "--metrics", "cka,voodoo"]) == 2
    assert "field 'align.metrics.1': unknown metric 'voodoo'" in capsys.readouterr().err
    assert main(["align", "--lake", lake, "--models", "clip_vit"]) == 2
    assert "has no model 'clip_vit'; it has: efficientnet_lite0" in capsys.readouterr().err


def test_a_metric_too_big_for_the_dataset_is_skipped_and_the_others_written(
    small_lake, tmp_path, capsys
):
    """mutual_knn with k=150 cannot run on 196 items with bootstrap resamples: it is skipped
    with the minimum n and the setting that would fit; CKA's scores are still written, and
    the study log records both."""
    lake, _ = small_lake
    config = tmp_path / "knn.yaml"
    config.write_text(
        "datasets: [{name: shapes, source: shapes}]\n"
        "models: [tiny_vit_random, tiny_gpt2_random]\n"
        "align: {metrics: [mutual_knn, cka], metric_kwargs: {mutual_knn: {k: 150}},"
        " bootstrap: 5, permutations: 0, studies: [layerwise, exemplar]}\n"
    )
    assert main(["align", "--config", str(config), "--lake", lake]) == 0
    out = capsys.readouterr().out
    n_min = metrics.min_items("mutual_knn", bootstrap=5, k=150)[0]
    fit = metrics.fit_options("mutual_knn", 196, bootstrap=5, k=150)
    assert n_min > 196 and 1 <= fit["k"] < 150
    assert (
        f"mutual_knn skipped: needs at least {n_min} items (k=150 neighbours besides the item "
        f"itself; 151 distinct in every bootstrap resample); the dataset has 196; to score it, "
        f"set align.metric_kwargs: {{mutual_knn: {{k: {fit['k']}}}}}, or add items"
    ) in out
    log = run_query(
        connect(lake),
        "SELECT study, metric, status, n, reason FROM study_log"
        " WHERE vision_model = 'tiny_vit_random' AND language_model = 'tiny_gpt2_random'"
        " ORDER BY ALL",
    ).to_pylist()
    statuses = {(r["study"], r["metric"], r["status"]) for r in log}
    assert ("layerwise", "mutual_knn", "skipped") in statuses
    assert ("layerwise", None, "written") in statuses
    # exemplar scores concepts (few in the small world): mutual_knn k=150 is skipped there too
    assert ("exemplar", "mutual_knn", "skipped") in statuses
    cka = run_query(
        connect(lake),
        "SELECT count(*) AS n FROM alignment WHERE study = 'layerwise' AND metric = 'cka'"
        " AND vision_model = 'tiny_vit_random' AND language_model = 'tiny_gpt2_random'",
    ).to_pylist()
    assert cka[0]["n"] == 9


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
    from vlray.options import ExemplarOptions, PerturbationOptions
    from vlray.studies import STUDY_NAMES

    lake, _ = small_lake
    # 4 perturbed scenes: too few for bootstrap intervals of a drop (min_items), so none
    options = AlignOptions(
        metrics=("cka",),
        bootstrap=5,
        permutations=5,
        exemplar=ExemplarOptions(draws=2),
        perturbation=PerturbationOptions(bootstrap=0),
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
    # 4 scenes: per direction a lexical trial each, a binding trial each and a relation trial
    # for the 3 whose layout allows one, each kind scored apart at every layer pair.
    trials = {"lexical": 4, "binding": 4, "relation": 3}
    for direction in ("text_to_image", "image_to_text"):
        for kind, count in trials.items():
            assert by[("forced_choice", "accuracy", f"{direction}/{kind}")] == {
                "study": "forced_choice",
                "metric": "accuracy",
                "condition": f"{direction}/{kind}",
                "n": 9 * 7,
                "items": count,
            }
    conditions = {c for s, m, c in by if s == "perturbation" and m == "cka_drop"}
    assert {"image_semantic", "image_appearance", "text_semantic", "text_appearance"} <= conditions
    assert "image_semantic/remove_object" in conditions
    assert {"text_semantic/role_swap", "text_semantic/remove_object"} <= conditions
    assert ("exemplar", "cka", "k=8/both") in by and ("exemplar", "cka", "k=16/text") not in by
    assert by[("concept_retrieval", "p@1", "nn")]["items"] == 24  # the shapes world's concepts
    assert ("concept_retrieval", "p@10", "csls/frequency=high") in by


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_score_is_refused_naming_where_it_arose(value):
    from vlray.results import Condition, score_row

    where = dict(study="layerwise", dataset="shapes", vision_model="v", language_model="t")
    place = dict(vision_layer=2, language_layer=3, metric="cka", condition=Condition(), n=10)
    with pytest.raises(ValueError, match=r"layerwise on shapes, v x t, layers \(2, 3\), cka"):
        score_row(**where, **place, value=value, run_id="r")
    # A non-finite statistic is only missing: it becomes null.
    row = score_row(**where, **place, value=0.5, run_id="r", ci_low=value, p_value=value)
    assert row["value"] == 0.5 and row["ci_low"] is None and row["p_value"] is None


def test_a_model_series_runs_only_its_studies_and_embeds_only_unperturbed(small_lake):
    """align.model_studies limits a model's pairs to the studies named; extract's
    unperturbed_only leaves a model only the unperturbed partition to compute."""
    from vlray.extract import partitions_to_compute
    from vlray.lake.fingerprints import ItemsFingerprint
    from vlray.options import ExtractOptions

    lake, _ = small_lake
    options = OPTIONS.model_copy(
        update={
            "studies": ("layerwise", "forced_choice"),
            "model_studies": {"tiny_vit_random": ("layerwise",)},
        }
    )
    specs = [get_spec(n) for n in ("efficientnet_lite0", "tiny_vit_random", "minilm_l6")]
    done = {s["vision_model"]: s["studies"] for s in run_align(lake, ["shapes"], specs, options)}
    assert set(done["efficientnet_lite0"]) == {"layerwise", "forced_choice"}
    assert set(done["tiny_vit_random"]) == {"layerwise"}  # no forced choice for its pair

    items = ItemsFingerprint.of(Lake(lake).read("items", {"dataset": "shapes"}))
    spec = get_spec("efficientnet_lite0_random")  # not embedded in this lake
    every = partitions_to_compute(Lake(lake), "shapes", spec, items, ExtractOptions())
    assert len(every) > 1 and "none" in every
    only = ExtractOptions(unperturbed_only=("efficientnet_lite0_random",))
    assert partitions_to_compute(Lake(lake), "shapes", spec, items, only) == ["none"]
