"""The five studies on a lake with planted answers (tests/planted.py), and the maps they use.

Each study must find what was planted in the signal model pair and not find it in the control
pair; the maps are checked against scipy and scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes

from tests.planted import CONCEPTS, SCENES, plant_lake
from vlray import metrics
from vlray.align import align_pair
from vlray.catalog import get_spec
from vlray.options import AlignOptions, ExemplarOptions
from vlray.results import CONDITION_COLUMNS, METRIC_COLUMNS, Condition, Metric
from vlray.sql import connect, run_query
from vlray.studies import STUDIES, STUDY_NAMES
from vlray.studies.concept_retrieval import chance
from vlray.studies.inputs import StudyInputs, StudySkipped

pytestmark = pytest.mark.timeout(300)

VISION, CONTROL, LANGUAGE = "efficientnet_lite0", "efficientnet_lite0_random", "minilm_l6"
OPTIONS = AlignOptions(
    metrics=("cka", "unbiased_cka"),
    bootstrap=50,
    permutations=50,
    exemplar=ExemplarOptions(draws=8),
)
# The parts of its condition each study fills (README, "The results table"); the rest are null.
CONDITION_PARTS = {
    "layerwise": set(),
    "perturbation": {"perturbation", "perturbation_family"},
    "forced_choice": {"direction", "trial_kind"},
    "exemplar": {"k", "averaged_side"},
    "concept_retrieval": {"retrieval", "breakdown", "bin"},
}
# Likewise the parts of its metric: the others write plain metrics, every part null.
METRIC_PARTS = {
    "layerwise": set(),
    "perturbation": {"drop_of"},
    "forced_choice": set(),
    "exemplar": set(),
    "concept_retrieval": {"top_k"},
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, ray_session):
    path = str(tmp_path_factory.mktemp("planted") / "lake")
    plant_lake(
        path, {VISION: ("vision", False), CONTROL: ("vision", True), LANGUAGE: ("language", False)}
    )
    return path


def _run(lake: str, vision: str, study: str) -> list[dict]:
    from vlray.lake import Lake

    inputs = StudyInputs(Lake(lake), "planted", get_spec(vision), get_spec(LANGUAGE), OPTIONS)
    rows = STUDIES[study].run(inputs, "test")
    assert_condition_columns(study, rows)
    assert_metric_columns(study, rows)
    return rows


def assert_condition_columns(study: str, rows: list[dict]) -> None:
    """Each row's typed condition columns make its label again (``Condition.label``, the one
    place a label is made), and the study fills its own parts and no other."""
    filled = set()
    for r in rows:
        parts = {c: r[c] for c in CONDITION_COLUMNS}
        assert Condition(**parts).label == r["condition"], r
        filled |= {c for c, value in parts.items() if value is not None}
    assert filled == CONDITION_PARTS[study], study


def assert_metric_columns(study: str, rows: list[dict]) -> None:
    """Each row with metric parts makes its label again from them (``Metric.label``, the one
    place such a label is made); a plain metric has none. The study fills its own parts only."""
    filled = set()
    for r in rows:
        parts = {c: r[c] for c in METRIC_COLUMNS}
        if any(value is not None for value in parts.values()):
            assert Metric(**parts).label == r["metric"], r
        filled |= {c for c, value in parts.items() if value is not None}
    assert filled == METRIC_PARTS[study], study


def _at(rows, **where):
    found = [r for r in rows if all(r[k] == v for k, v in where.items())]
    assert len(found) == 1, (where, len(found))
    return found[0]


def test_registry_matches_the_results_conventions():
    assert tuple(STUDIES) == STUDY_NAMES


def test_layerwise_finds_the_signal_layer(planted):
    rows = _run(planted, VISION, "layerwise")
    signal = _at(rows, metric="unbiased_cka", vision_layer=1, language_layer=1)
    noise = _at(rows, metric="unbiased_cka", vision_layer=0, language_layer=1)
    assert signal["value"] > 0.3 and signal["p_value"] < 0.05
    assert signal["ci_low"] <= signal["value"] <= signal["ci_high"]
    assert abs(noise["value"]) < 0.1


def test_perturbation_semantic_drops_appearance_does_not(planted):
    rows = _run(planted, VISION, "perturbation")
    drops = {r["condition"]: r for r in rows if r["drop_of"] == "unbiased_cka"}
    assert {r["metric"] for r in drops.values()} == {"unbiased_cka_drop"}
    assert set(drops) >= {
        "image_semantic/replace",
        "image_appearance/jitter",
        "image_semantic",
        "text_semantic",
        "text_appearance",
    }
    for side in ("image", "text"):
        semantic, appearance = drops[f"{side}_semantic"], drops[f"{side}_appearance"]
        assert semantic["ci_low"] > 0.1, semantic  # a real drop, its interval above 0
        assert appearance["ci_low"] < 0 < appearance["ci_high"] or abs(appearance["value"]) < 0.05
        assert (semantic["vision_layer"], semantic["language_layer"]) == (1, 1)  # at the peak
    # The unperturbed grid on the same items sits beside the perturbed ones.
    none = _at(rows, metric="unbiased_cka", condition="none", vision_layer=1, language_layer=1)
    replaced = _at(
        rows,
        metric="unbiased_cka",
        condition="image_semantic/replace",
        vision_layer=1,
        language_layer=1,
    )
    assert none["n"] == replaced["n"] == SCENES
    assert drops["image_semantic/replace"]["value"] == pytest.approx(
        none["value"] - replaced["value"]
    )


def test_forced_choice_mirrors_preference_and_controls_sit_at_chance(planted):
    rows = _run(planted, VISION, "forced_choice")
    for direction in ("text_to_image", "image_to_text"):
        best = _at(rows, condition=f"{direction}/lexical", vision_layer=1, language_layer=1)
        assert best["n"] == SCENES and best["null_mean"] == 0.5
        # the binomial null: chance, and its spread as a rate
        assert best["null_sd"] == pytest.approx((0.25 / SCENES) ** 0.5)
        assert best["calibrated"] == pytest.approx(best["value"] - 0.5)
        assert best["z_score"] == pytest.approx(best["calibrated"] / best["null_sd"])
        assert best["value"] >= 0.85 and best["p_value"] < 1e-4 and best["ci_low"] > 0.5
    control = _run(planted, CONTROL, "forced_choice")
    for direction in ("text_to_image", "image_to_text"):
        r = _at(control, condition=f"{direction}/lexical", vision_layer=1, language_layer=1)
        assert 0.2 <= r["value"] <= 0.8 and r["p_value"] > 0.01


def test_exemplar_averaging_raises_concept_alignment(planted):
    rows = _run(planted, VISION, "exemplar")
    curve = {
        r["condition"]: r
        for r in rows
        if r["metric"] == "unbiased_cka" and (r["vision_layer"], r["language_layer"]) == (1, 1)
    }
    assert set(curve) == {f"k={k}/{s}" for k in (1, 2, 4, 8) for s in ("image", "text", "both")}
    assert curve["k=1/image"]["value"] == curve["k=1/both"]["value"]  # one point: curves meet
    assert curve["k=8/both"]["value"] > curve["k=1/both"]["ci_high"]
    assert curve["k=8/both"]["value"] > curve["k=2/both"]["value"] > curve["k=1/both"]["value"]
    assert curve["k=8/both"]["n"] == len(CONCEPTS)


def test_concept_retrieval_counts_aliases_and_reports_chance(planted):
    rows = _run(planted, VISION, "concept_retrieval")
    words = len(CONCEPTS) * 2 + 20  # concepts, their aliases, distractors
    p1 = _at(rows, metric="p@1", condition="nn")
    p10 = _at(rows, metric="p@10", condition="nn")
    assert (p1["top_k"], p10["top_k"]) == (1, 10)
    assert p1["null_mean"] == pytest.approx(chance(words, 2, 1)) == pytest.approx(2 / words)
    assert p10["value"] >= 3 * p10["null_mean"] and p10["p_value"] < 0.05
    assert p1["value"] >= 0.5 and p1["n"] == len(CONCEPTS)
    assert not [r for r in rows if r["metric"] == "p@100"]  # 100 >= vocabulary: left out
    bins = {r["condition"] for r in rows if r["metric"] == "p@1"}
    assert {"nn/dispersion=low", "csls/frequency=high"} <= bins
    assert not [b for b in bins if "polysemy" in b]  # no polysemy column: no bins
    control = _run(planted, CONTROL, "concept_retrieval")
    assert _at(control, metric="p@10", condition="nn")["p_value"] > 0.01


def test_chance_matches_simulation():
    rng = np.random.default_rng(0)
    n_words, n_aliases, k = 30, 3, 5
    draws = [bool(set(rng.choice(n_words, k, replace=False)) & {0, 1, 2}) for _ in range(20000)]
    assert chance(n_words, n_aliases, k) == pytest.approx(np.mean(draws), abs=0.01)
    assert chance(30, 1, 1) == pytest.approx(1 / 30)
    assert chance(10, 1, 10) == 1.0
    assert chance(n_words, n_aliases, k) == pytest.approx(1 - math.comb(27, 5) / math.comb(30, 5))


def test_study_without_inputs_is_skipped_with_a_reason(planted, tmp_path):
    from vlray.lake import Lake

    lake = Lake(planted)
    inputs = StudyInputs(lake, "planted", get_spec(VISION), get_spec(LANGUAGE), OPTIONS)
    lake.remove_table_for("planted", "trials")
    try:
        with pytest.raises(StudySkipped, match="no forced-choice trials"):
            STUDIES["forced_choice"].run(inputs, "test")
    finally:
        from tests.planted import _trials
        from vlray.items import trials_table

        lake.write_table_for("planted", "trials", trials_table(_trials()), "restore")


def test_align_pair_writes_each_study_and_sql_reads_them(planted):
    from vlray.lake import Lake

    summary = align_pair(
        Lake(planted).pinned(),
        "planted",
        get_spec(VISION).model_dump(),
        get_spec(LANGUAGE).model_dump(),
        OPTIONS,
        list(STUDY_NAMES),
        "run-1",
    )
    assert set(summary["studies"]) == set(STUDY_NAMES)
    assert all("rows" in s for s in summary["studies"].values()), summary
    hashes = Lake(planted).results_inputs_hashes()
    assert hashes[("exemplar", "planted", VISION, LANGUAGE)] is not None
    counts = run_query(
        connect(planted),
        """
        SELECT study, count(*) AS n, count(DISTINCT metric) AS metrics FROM alignment
        GROUP BY study ORDER BY study""",
    ).to_pylist()
    assert [c["study"] for c in counts] == sorted(STUDY_NAMES)
    # The view has the typed condition columns, as the studies wrote them.
    for study in STUDY_NAMES:
        rows = run_query(connect(planted), "SELECT * FROM alignment WHERE study = $s", {"s": study})
        assert_condition_columns(study, rows.to_pylist())


def test_ridge_map_matches_scikit_learn():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(60, 10)), rng.normal(size=(10, 7))
    y = x @ w + 0.1 * rng.normal(size=(60, 7))
    fitted = metrics.RidgeMap(alphas=[0.5]).fit(x, [y])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    ref = Ridge(alpha=0.5).fit(xn, yn)
    new = rng.normal(size=(5, 10))
    newn = new / np.linalg.norm(new, axis=1, keepdims=True)
    ours = fitted.queries(new)[0].numpy() + fitted.y_means[0].numpy()
    np.testing.assert_allclose(ours, ref.predict(newn), atol=1e-8)


def test_procrustes_map_recovers_a_planted_rotation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    y = x @ q
    fitted = metrics.ProcrustesMap().fit(x, [y])
    mapped = fitted.queries(x)[0].numpy()
    targets = fitted.candidates(0, y).numpy()
    np.testing.assert_allclose(mapped, targets, atol=1e-8)
    # Same rotation as scipy's on the same (normalised, centred, PCA) coordinates.
    xa = fitted.x_axes[0].numpy()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    xp = (xn - fitted.x_mean.numpy()) @ xa
    r, _ = orthogonal_procrustes(xp, targets)
    np.testing.assert_allclose(fitted.rotations[0].numpy(), r, atol=1e-8)


def test_procrustes_map_with_fewer_training_rows_than_axes_is_determined():
    # 12 training rows in 40 dimensions, PCA fitted on all 30 rows (as concept retrieval
    # does): the map may use at most 11 axes, so that the held-out rows' similarities do not
    # hang on rounding noise: reordering the PCA rows, or fitting the bases once
    # (PcaBasis) instead of per call, gives the same similarities.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 40))
    y = x[:, :25] @ rng.normal(size=(25, 25)) + 0.5 * rng.normal(size=(30, 25))
    train, test = np.arange(12), np.arange(12, 30)

    def held_out_similarities(pca_x, pca_y):
        fitted = metrics.ProcrustesMap().fit(x[train], [y[train]], pca_x=pca_x, pca_ys=[pca_y])
        assert fitted.rotations[0].shape == (11, 11)
        return metrics.cosine(fitted.queries(x[test])[0], fitted.candidates(0, y[test])).numpy()

    want = held_out_similarities(x, y)
    order = rng.permutation(30)
    np.testing.assert_allclose(held_out_similarities(x[order], y[order]), want, atol=1e-9)
    bases = metrics.PcaBasis.fit(x), metrics.PcaBasis.fit(y)
    np.testing.assert_allclose(held_out_similarities(*bases), want, atol=1e-12)


def test_maps_reject_bad_input_by_name():
    with pytest.raises(metrics.MetricInputError, match="source: contains NaN"):
        metrics.RidgeMap().fit(np.full((5, 3), np.nan), [np.ones((5, 2))])
    with pytest.raises(metrics.MetricInputError, match="target 0: 4 rows, but the source has 5"):
        metrics.ProcrustesMap().fit(np.eye(5), [np.ones((4, 2))])


def test_ridge_map_penalty_minimises_brute_force_gcv():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 12))
    y = x @ rng.normal(size=(12, 5)) + rng.normal(size=(40, 5))
    alphas = [0.01, 0.1, 1.0, 10.0, 100.0]
    fitted = metrics.RidgeMap(alphas=alphas).fit(x, [y])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    xc, yc = xn - xn.mean(axis=0), yn - yn.mean(axis=0)
    gcv = []
    for a in alphas:  # the hat matrix written out, plus one for the intercept
        hat = xc @ np.linalg.solve(xc.T @ xc + a * np.eye(12), xc.T)
        residual = ((yc - hat @ yc) ** 2).sum()
        gcv.append(residual / (40 - 1 - np.trace(hat)) ** 2)
    assert fitted.chosen_alphas[0] == alphas[int(np.argmin(gcv))]
    assert len(set(np.round(gcv, 12))) == len(alphas)  # the choice is not a tie
