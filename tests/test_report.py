"""`vlray report` and the headline findings, on synthetic alignment tables that follow the
studies' conventions: planted so that each finding holds, or planted against it."""

from __future__ import annotations

import datetime as dt
import math
import re

import numpy as np
import pyarrow as pa
import pytest
from markupsafe import escape as html_escape  # as the report's templates escape
from PIL import Image

from vlray.items import ITEMS_SCHEMA, QUARANTINE_SCHEMA
from vlray.lake import Lake
from vlray.report import FINDINGS, findings, plots, write_report
from vlray.report.data import ReportError, fmt, load
from vlray.report.sections import layerwise_heatmaps, study_log_section
from vlray.results import (
    Condition,
    Metric,
    alignment_table,
    calibrate,
    metric_columns,
    study_log_row,
    study_log_table,
)

V, T = "efficientnet_lite0", "minilm_l6"  # the pretrained pair
VR, TR = "efficientnet_lite0_random", "minilm_l6_random"  # their random-init controls
# The size series: V and two more vision models with a larger ImageNet accuracy (catalog),
# scored with T in the layerwise study only; their planted calibrated score grows with it
# (hold) or falls (against).
SERIES = {"efficientnet_lite1": 0.05, "efficientnet_lite2": 0.10}
TRIAL_KINDS = ("lexical", "binding", "relation")
HEADLINE = [
    "depth",
    "controls",
    "size_series",
    "semantic_vs_appearance",
    "same_words",
    *(f"forced_choice/{kind}" for kind in TRIAL_KINDS),
    "exemplar",
    "concept_retrieval",
]
NV, NT = 5, 7  # vision layers 0..4, language layers 0..6
DATASET = "shapes"
FAMILY_PERTURBATIONS = {
    "image_appearance": ["recolour_background"],
    "image_semantic": ["remove_object", "swap_attributes"],
    "text_appearance": ["typo"],
    "text_semantic": ["scramble", "role_swap"],
}
ALL_STUDIES = ("layerwise", "perturbation", "forced_choice", "exemplar", "concept_retrieval")
NOW = dt.datetime(2025, 1, 2, 3, 4, tzinfo=dt.UTC)


def _row(
    study,
    vision,
    language,
    vl,
    ll,
    metric: str | Metric,
    condition: Condition,
    value,
    lo=None,
    hi=None,
    null=None,
    p=None,
    n=192,
    sd=None,
):
    calibrated, z_score = calibrate(float(value), null, sd)
    return {
        "study": study,
        "dataset": DATASET,
        "vision_model": vision,
        "language_model": language,
        "vision_layer": vl,
        "language_layer": ll,
        **metric_columns(metric),
        "condition": condition.label,
        **condition.columns(),
        "value": float(value),
        "ci_low": lo,
        "ci_high": hi,
        "null_mean": null,
        "null_sd": sd,
        "calibrated": calibrated,
        "z_score": z_score,
        "p_value": p,
        "n": n,
        "run_id": f"run-{study}",
        "created_at": NOW,
    }


def _layer_value(vision, language, i, j, hold):
    """Planted layerwise score: grows with vision depth for the pretrained pair (hold), flat
    otherwise; controls stay low (hold) or beat the pretrained pair (against); the size
    series' models above the pretrained pair (hold) or below it (against)."""
    control = vision in (VR,) or language in (TR,)
    if control:
        return 0.08 + 0.01 * i if hold else 0.9
    step = SERIES.get(vision, 0.0) * (1 if hold else -1)
    if hold:
        return 0.1 + 0.5 * (i / (NV - 1)) * (0.5 + 0.5 * j / (NT - 1)) + step
    return 0.3 + step


def _grid(study, vision, language, metric, condition, value_of, **kw):
    return [
        _row(
            study,
            vision,
            language,
            i,
            j,
            metric,
            condition,
            value_of(i, j),
            value_of(i, j) - 0.03,
            value_of(i, j) + 0.03,
            **kw,
        )
        for i in range(NV)
        for j in range(NT)
    ]


def _wilson(acc, n, z=1.96):
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def build_rows(
    hold: bool, studies=ALL_STUDIES, control_fc: float = 0.5, series: bool = False
) -> dict[str, list]:
    """Planted rows per study; with ``series``, the size series' layerwise grids too."""
    pairs = [(V, T), (VR, T), (V, TR), (VR, TR)]
    out: dict[str, list] = {s: [] for s in studies}
    if "layerwise" in studies:
        for v, t in pairs + [(v, T) for v in SERIES if series]:
            for metric in ("cka", "mutual_knn"):
                out["layerwise"] += _grid(
                    "layerwise",
                    v,
                    t,
                    metric,
                    Condition(),
                    lambda i, j, v=v, t=t: _layer_value(v, t, i, j, hold),
                    null=0.02,
                    p=0.001,
                )
    if "perturbation" in studies:
        for v, t in pairs[:2]:
            base = lambda i, j, v=v, t=t: _layer_value(v, t, i, j, True)  # noqa: E731
            unperturbed = Condition(perturbation="none")
            out["perturbation"] += _grid("perturbation", v, t, "cka", unperturbed, base)
            peak = (NV - 1, NT - 1)
            for family, names in FAMILY_PERTURBATIONS.items():
                semantic = family.endswith("semantic")
                drop = (0.3 if semantic else 0.02) if hold else (0.01 if semantic else 0.25)
                for name in names:
                    cond = Condition(perturbation=f"{family}/{name}", perturbation_family=family)
                    out["perturbation"] += _grid(
                        "perturbation",
                        v,
                        t,
                        "cka",
                        cond,
                        lambda i, j, base=base, drop=drop: base(i, j) - drop,
                    )
                    out["perturbation"].append(
                        _row(
                            "perturbation",
                            v,
                            t,
                            *peak,
                            Metric(drop_of="cka"),
                            cond,
                            drop,
                            drop - 0.05,
                            drop + 0.05,
                        )
                    )
                out["perturbation"].append(
                    _row(
                        "perturbation",
                        v,
                        t,
                        *peak,
                        Metric(drop_of="cka"),
                        Condition(perturbation_family=family),
                        drop,
                        drop - 0.04,
                        drop + 0.04,
                    )
                )
    if "forced_choice" in studies:
        n = 200
        for v, t in pairs:
            deep = (0.86 if hold else 0.53) if (v, t) == (V, T) else control_fc
            for i in range(NV):
                for j in range(NT):
                    for d in [
                        Condition(direction=x, trial_kind=kind)
                        for x in ("text_to_image", "image_to_text")
                        for kind in TRIAL_KINDS
                    ]:
                        acc = deep if (i, j) == (NV - 1, NT - 1) else 0.55
                        lo, hi = _wilson(acc, n)
                        from scipy.stats import binomtest

                        p = binomtest(round(acc * n), n, 0.5, alternative="greater").pvalue
                        out["forced_choice"].append(
                            _row("forced_choice", v, t, i, j, "accuracy", d, acc, lo, hi, 0.5, p, n)
                        )
    if "exemplar" in studies:
        for v, t in pairs[:2]:
            for side in ("image", "text", "both"):
                for k in (1, 2, 4, 8):
                    step = {"image": 0.03, "text": 0.02, "both": 0.04}[side]
                    gain = step * math.log2(k) * (1 if hold else -1)
                    base = 0.6 if (v, t) == (V, T) else 0.1
                    out["exemplar"] += _grid(
                        "exemplar",
                        v,
                        t,
                        "cka",
                        Condition(k=k, averaged_side=side),
                        lambda i, j, base=base, gain=gain: base * (i + 1) / NV + gain,
                        null=0.03,
                    )
    if "concept_retrieval" in studies:
        n_concepts = 200
        for v, t in pairs[:2]:
            good = (v, t) == (V, T) and hold
            for method in ("nn", "csls"):
                bins = [(None, None)] + [
                    (b, x) for b in ("dispersion", "frequency") for x in ("low", "mid", "high")
                ]
                for breakdown, bin_ in bins:
                    for k in (1, 10, 100):
                        chance = k / n_concepts
                        value = min(0.97, (0.3 if good else 0.04) * math.sqrt(k)) + (
                            0.02 if method == "csls" else 0
                        )
                        if bin_ == "high":
                            value *= 0.5
                        out["concept_retrieval"].append(
                            _row(
                                "concept_retrieval",
                                v,
                                t,
                                NV - 1,
                                NT - 1,
                                Metric(top_k=k),
                                Condition(retrieval=method, breakdown=breakdown, bin=bin_),
                                value,
                                max(0, value - 0.05),
                                min(1, value + 0.05),
                                chance,
                                None,
                                n_concepts,
                            )
                        )
    return out


def make_lake(path, hold=True, studies=ALL_STUDIES, **kw) -> str:
    lake = Lake(str(path))
    for study, rows in build_rows(hold, studies, **kw).items():
        lake.write_results(alignment_table(rows), {"study": study}, "h", "run-test")
    return str(path)


def _assert_real_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        img.load()
        assert img.size[0] > 100 and img.size[1] > 100
        arr = np.asarray(img.convert("RGB"))
    assert arr.reshape(-1, 3).std(axis=0).max() > 5, f"{path.name} is a flat colour"


@pytest.fixture(scope="module")
def planted_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    lake = make_lake(root / "lake", hold=True, series=True)
    index = write_report(lake, root / "out")
    return lake, index


def test_report_writes_every_figure(planted_report):
    lake, index = planted_report
    out = index.parent
    html = index.read_text()
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    expected = (
        [
            f"layerwise__shapes__{v}__{t}__{m}.png"
            for v in (V, VR)
            for t in (T, TR)
            for m in ("cka", "mutual_knn")
        ]
        + [f"perturbation__shapes__{v}__{T}__cka.png" for v in (V, VR)]
        + [f"forced_choice__shapes__{v}__{t}.png" for v in (V, VR) for t in (T, TR)]
        + [f"exemplar__shapes__{v}__{T}__cka.png" for v in (V, VR)]
        + [
            f"concept_retrieval__shapes__{v}__{T}{b}.png"
            for v in (V, VR)
            for b in ("", "__dispersion", "__frequency")
        ]
    )
    assert set(expected) <= names, set(expected) - names
    for p in pngs:
        _assert_real_png(p)
        assert f'src="{p.name}"' in html
        assert p.with_suffix(".csv").exists() or "concept_retrieval" in p.name
    # Every figure's numbers sit beside it; no JavaScript.
    assert "<script" not in html.lower()
    for study in ALL_STUDIES:
        assert f'id="{study}"' in html
    assert 'class="not-run"' not in html
    # The layerwise peak of the pretrained pair with its place, as a number.
    peak = _layer_value(V, T, NV - 1, NT - 1, True)
    assert f"cka peaks at {fmt(peak)}" in html
    assert "vision layer 4 (relative depth 1.00) x language layer 6" in html
    assert "deepest third of vision layers" in html
    # Forced choice says where it is read; retrieval tables give chance beside CIs.
    assert (
        "at the deepest layer pair (vision layer 4 x language layer 6): lexical text_to_image"
        in html
    )
    # The calibrated scores and the size series have their figures.
    assert "calibrated__shapes__cka.png" in html
    assert "size_series__shapes__minilm_l6__cka.png" in html
    assert "x chance" in html and "dispersion" in html and "frequency" in html
    # Header: lake, datasets, run ids.
    assert lake in html and "run-layerwise" in html and DATASET in html


def test_findings_hold_on_planted_data(planted_report):
    lake, _ = planted_report
    found = findings(lake)
    # The size series' pairs ran the layerwise study only: depth and controls are stated for
    # all three pretrained pairs, every other finding for the one pair that ran its study.
    assert [f.name for f in found] == ["depth"] * 3 + ["controls"] * 3 + HEADLINE[2:]
    assert set(HEADLINE) <= set(FINDINGS)
    for f in found:
        assert f.holds is True and f.status == "holds", f.line()
        assert f.rule and f.selection and f.controls, f.name  # each says how it is read
        assert re.search(r"\d\.\d\d", f.text), f.text
    by = {f.name: f for f in found if f.vision_model == V}
    assert set(by) == set(HEADLINE) - {"size_series"}
    assert all((f.dataset, f.language_model) == (DATASET, T) for f in by.values())
    assert by["depth"].metric == "cka"
    # Controls compare calibrated scores (value - null mean) at both selections.
    for selection in ("deepest", "best"):
        scores = by["controls"].numbers[selection]
        assert scores["pair"] > max(v for k, v in scores.items() if k != "pair")
    assert by["controls"].numbers["best"]["pair"] == pytest.approx(0.6 - 0.02)
    series = next(f for f in found if f.name == "size_series")
    assert series.vision_model == f"{V} < efficientnet_lite1 < efficientnet_lite2"
    assert list(series.numbers["best"]) == [V, "efficientnet_lite1", "efficientnet_lite2"]
    assert "role_swap" in by["same_words"].text
    assert "CIs do not overlap" in by["exemplar"].text
    assert by["concept_retrieval"].numbers["ratio"] >= 3


def test_report_reads_the_metric_parts_not_the_labels(planted_report):
    """P@K's K and the metric a drop is of come from the typed columns (top_k, drop_of)."""
    lake, _ = planted_report
    data = load(lake)
    retrieval = data["retrieval"]
    assert {r["at_k"] for r in retrieval} == {1, 10, 100}
    assert all(r["metric"] == Metric(top_k=r["at_k"]).label for r in retrieval)
    drops = data["drops"]
    assert drops and {r["metric"] for r in drops} == {"cka"}  # the metric dropped
    assert all(r["unperturbed"] is not None for r in drops)
    assert all((r["perturbed"] is None) == (r["perturbation"] is None) for r in drops)


def test_findings_do_not_hold_when_planted_against(tmp_path):
    lake = make_lake(tmp_path / "lake", hold=False, series=True)
    every = findings(lake)
    found = {f.name: f for f in every if f.vision_model == V or f.name == "size_series"}
    assert set(found) == set(HEADLINE)
    # Forced choice planted at 0.53 (p = 0.22): above chance in direction only, which the
    # binomial test does not support: "not significant", not "holds" nor "does not hold".
    for kind in TRIAL_KINDS:
        fc = found[f"forced_choice/{kind}"]
        assert fc.status == "not significant", fc.line()
    for f in found.values():
        if not f.name.startswith("forced_choice"):
            assert f.holds is False, f.line()
    assert "not higher" in found["depth"].text  # flat depth profile
    assert found["depth"].numbers["deep_mean"] == pytest.approx(0.3)
    assert found["concept_retrieval"].numbers["ratio"] < 3
    # The report still renders, saying "does not hold".
    html = write_report(lake, tmp_path / "out").read_text()
    assert html.count('class="does-not-hold"') == sum(f.holds is False for f in every)
    assert html.count('class="not-significant"') == len(TRIAL_KINDS)


def test_a_direction_the_null_explains_is_not_significant(tmp_path):
    """Small-n honesty: depth still rises and the pretrained peak still tops the controls,
    but the scores sit on their permutation null (p = 0.3, null mean just below each
    score): both findings read "not significant", with the numbers, never "holds"."""
    rows = build_rows(True, ("layerwise",), series=True)["layerwise"]
    for r in rows:
        # the null explains nine tenths of every score: the calibrated scores keep their
        # order, but none beats its null (p = 0.3)
        r["p_value"], r["null_mean"] = 0.3, 0.9 * r["value"]
        r["calibrated"] = r["value"] - r["null_mean"]
    lake = Lake(str(tmp_path / "lake"))
    lake.write_results(alignment_table(rows), {"study": "layerwise"}, "h", "run-test")
    every = findings(str(tmp_path / "lake"))
    found = {f.name: f for f in every if f.vision_model == V or f.name == "size_series"}
    depth, controls, series = found["depth"], found["controls"], found["size_series"]
    assert depth.holds is True and depth.status == "not significant", depth.line()
    assert "median p=0.3" in depth.text and "[not significant] Alignment grows" in depth.line()
    assert controls.holds is True and controls.status == "not significant", controls.line()
    assert "best: p=0.3" in controls.text
    assert series.holds is True and series.status == "not significant", series.line()
    html = write_report(str(tmp_path / "lake"), tmp_path / "out").read_text()
    assert html.count('class="not-significant"') == sum(
        f.status == "not significant" for f in every
    )


def test_no_null_and_no_interval_is_not_significant(tmp_path):
    rows = build_rows(True, ("layerwise",))["layerwise"]
    for r in rows:
        r.update(p_value=None, null_mean=None, ci_low=None, ci_high=None)
    lake = Lake(str(tmp_path / "lake"))
    lake.write_results(alignment_table(rows), {"study": "layerwise"}, "h", "run-test")
    depth = next(f for f in findings(str(tmp_path / "lake")) if f.name == "depth")
    assert depth.status == "not significant"
    assert "no permutation null or bootstrap interval to test it against" in depth.text


def test_control_above_chance_is_stated(tmp_path):
    lake = make_lake(tmp_path / "lake", studies=("forced_choice",), control_fc=0.9)
    fc = next(f for f in findings(lake) if f.name == "forced_choice/binding")
    assert fc.holds is True
    assert f"{VR} x {T}: text_to_image 0.90 ABOVE CHANCE" in fc.text
    assert "passes these trials too" in fc.text
    assert f"{VR} x {T}" in fc.numbers["controls_above_chance"]


def test_missing_studies_say_not_run(tmp_path):
    lake = make_lake(tmp_path / "lake", studies=("layerwise",))
    found = {f.name: f for f in findings(lake)}
    assert found["depth"].holds is True and found["controls"].holds is True
    missing = (
        "size_series",
        "semantic_vs_appearance",
        "same_words",
        "forced_choice",
        "exemplar",
        "concept_retrieval",
    )
    for name in missing:
        assert found[name].holds is None and found[name].text.startswith("not run")
    index = write_report(lake, tmp_path / "out")
    html = index.read_text()
    for study in ("perturbation", "forced_choice", "exemplar", "concept_retrieval"):
        assert f"not run: the lake has no &#39;{study}&#39; results" in html
    assert html.count('class="not-run"') == len(missing)
    drawn = {p.name.split("__")[0] for p in index.parent.glob("*.png")}
    assert drawn == {"layerwise", "calibrated"}


def test_model_not_in_catalog_counts_as_pretrained(tmp_path):
    rows = build_rows(True, ("layerwise",))["layerwise"]
    for r in rows:
        r["vision_model"] = {V: "my_own_vit", VR: "my_own_vit_random"}[r["vision_model"]]
    Lake(str(tmp_path / "lake")).write_results(
        alignment_table(rows), {"study": "layerwise"}, "h", "run-test"
    )
    found = findings(str(tmp_path / "lake"))
    pairs = {(f.vision_model, f.language_model) for f in found if f.vision_model}
    # Neither vision model is in the catalog: both count as pretrained; the random language
    # twin stays a control.
    assert pairs == {("my_own_vit", T), ("my_own_vit_random", T)}
    html = write_report(str(tmp_path / "lake"), tmp_path / "out").read_text()
    assert "not recorded, not in the catalog: taken as pretrained" in html


def _record_init(lake: Lake, inits: dict[str, str]) -> None:
    """Manifest records, as extraction writes them, with each model's init."""
    for model, init in inits.items():
        record = {"dataset": DATASET, "model": model, "perturbation": "none", "init": init}
        lake.commit_embeddings(DATASET, model, [], [record], "run-test")


def test_controls_are_what_the_lake_recorded_not_what_the_catalog_says(tmp_path):
    """The catalog says VR is a random-init control; the lake recorded it as pretrained when it
    was embedded (the catalog has changed since): the report goes by the lake."""
    lake = Lake(make_lake(tmp_path / "lake", studies=("layerwise",)))
    _record_init(lake, {V: "pretrained", VR: "pretrained", T: "pretrained", TR: "random"})
    data = load(lake.uri)
    assert [data.is_control(m) for m in (V, VR, T, TR)] == [False, False, False, True]
    assert {data.info[m].source for m in (V, VR, T, TR)} == {"lake"}
    pairs = {(f.vision_model, f.language_model) for f in findings(lake.uri) if f.vision_model}
    assert pairs == {(V, T), (VR, T)}  # VR is no control here: its pair with T is reported
    # The page's table of models says so (its rendering is tested with the whole page).
    assert data.info[VR].provenance == "recorded in the lake when embedded"


def test_names_from_the_lake_are_text_on_the_page(tmp_path):
    """A model or dataset name with markup in it is escaped (the templates autoescape)."""
    model, dataset = "<script>alert('v')</script>", "<script>d</script>"
    rows = build_rows(True, ("layerwise",))["layerwise"]
    for r in rows:
        r["dataset"] = dataset
        if r["vision_model"] == V:
            r["vision_model"] = model
    Lake(str(tmp_path / "lake")).write_results(
        alignment_table(rows), {"study": "layerwise"}, "h", "run-test"
    )
    html = write_report(str(tmp_path / "lake"), tmp_path / "out").read_text()
    assert "<script" not in html.lower()
    assert html_escape(model) in html and html_escape(dataset) in html
    assert f"<td>{html_escape(model)}</td>" in html  # the models table names it, as text


def test_nan_scores_are_left_out(tmp_path):
    rows = build_rows(True, ("layerwise",))["layerwise"]
    for r in rows:
        if r["vision_model"] == V and r["language_model"] == T and r["metric"] == "cka":
            if (r["vision_layer"], r["language_layer"]) == (NV - 1, NT - 1):
                r["value"] = float("nan")  # DuckDB sorts NaN above every number
        if r["vision_model"] == VR and r["language_model"] == TR and r["metric"] == "cka":
            r["value"] = float("nan")  # a grid with no finite score at all
    Lake(str(tmp_path / "lake")).write_results(
        alignment_table(rows), {"study": "layerwise"}, "h", "run-test"
    )
    found = {f.name: f for f in findings(str(tmp_path / "lake"))}
    assert found["depth"].holds is True and "nan" not in found["depth"].text
    second = _layer_value(V, T, NV - 1, NT - 2, True)
    # the best layer pair is the next one, by its calibrated score (value - null mean)
    assert f"calibrated {fmt(second - 0.02)}" in found["controls"].text
    html = write_report(str(tmp_path / "lake"), tmp_path / "out").read_text()
    assert f"cka peaks at {fmt(second)}" in html and "no finite score" in html
    assert not (tmp_path / "out" / f"layerwise__shapes__{VR}__{TR}__cka.png").exists()


def test_cli_report(tmp_path, capsys):
    from vlray.cli import main

    lake = make_lake(tmp_path / "lake", studies=("layerwise", "forced_choice"))
    assert main(["report", "--lake", lake, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "index.html").exists()
    assert "[holds] Alignment grows with vision depth" in printed
    assert "[not run] Concept retrieval" in printed

    # A lake with no alignment results: a clear error naming the lake.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", "--lake", str(empty), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no alignment results" in err
    assert not (tmp_path / "o2" / "index.html").exists()
    # No lake at all.
    assert main(["report", "--lake", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_findings_on_empty_lake_are_not_run(tmp_path):
    (tmp_path / "lake").mkdir()
    found = findings(str(tmp_path / "lake"))
    assert found and all(f.holds is None for f in found)
    with pytest.raises(ReportError, match="no alignment results"):
        write_report(str(tmp_path / "lake"), tmp_path / "out")


# --- a researcher's own data: what was refused, what did not run, heatmaps to compare --------

V_NAMES = [f"blocks.{i}" for i in range(NV)]
T_NAMES = [f"encoder.layer.{j}" for j in range(NT)]


def _quarantined(item, stage, reason, model=None, perturbation="none"):
    return {
        "dataset": DATASET,
        "item_id": item,
        "modality": "image",
        "perturbation": perturbation,
        "stage": stage,
        "reason": reason,
        "source": "shapes",
        "model": model,
        "created_at": NOW,
    }


def _log(study, status, metric=None, reason=None, n=None, rows=0):
    return study_log_row(
        study=study,
        dataset=DATASET,
        vision_model=V,
        language_model=T,
        status=status,
        run_id="run-align",
        metric=metric,
        reason=reason,
        n=n,
        rows=rows,
    )


def _write_log(lake: Lake, study: str, rows: list[dict]) -> None:
    where = {"study": study, "dataset": DATASET, "vision_model": V, "language_model": T}
    lake.write_study_log(study_log_table(rows), where, "run-align")


@pytest.fixture(scope="module")
def own_data_report(tmp_path_factory):
    """A layerwise lake with what a researcher's own data brings: rows refused by the source
    and by a model, a manifest naming the pretrained pair's layers (the random language twin
    has none), and a study log with a skipped, a failed and a small-n study beside written
    ones; and its report."""
    root = tmp_path_factory.mktemp("own")
    uri = make_lake(root / "lake", studies=("layerwise",))
    lake = Lake(uri)
    refused = [
        _quarantined(f"img-{k}", "read", "cannot read image: no such file") for k in (1, 2, 3)
    ]
    refused += [_quarantined(f"cap-{k}", "validate", f"odd caption {k}") for k in range(5)]
    lake.write_items(
        DATASET, ITEMS_SCHEMA.empty_table(), pa.Table.from_pylist(refused, QUARANTINE_SCHEMA), "q"
    )
    embed = [_quarantined("img-9", "embed", "CUDA out of memory", V, p) for p in ("none", "blur")]
    lake.merge_quarantine(
        DATASET, V, pa.Table.from_pylist(embed, QUARANTINE_SCHEMA), ["none", "blur"], "q"
    )
    for model, names in ((V, V_NAMES), (T, T_NAMES)):
        record = {
            "dataset": DATASET,
            "model": model,
            "perturbation": "none",
            "layers": len(names),
            "layer_names": names,
        }
        lake.commit_embeddings(DATASET, model, [], [record], "run-extract")
    small = "scores from only 12 items; below the documented minimum of 50"
    _write_log(
        lake,
        "layerwise",
        [
            _log("layerwise", "written", n=12, rows=70),
            _log("layerwise", "small_n", "cka", small, n=12, rows=35),
        ],
    )
    _write_log(lake, "forced_choice", [_log("forced_choice", "skipped", reason="no trials table")])
    _write_log(lake, "exemplar", [_log("exemplar", "failed", reason="ValueError: k=8 > 4")])
    index = write_report(uri, root / "out")
    return uri, index.read_text()


def _section_html(html: str, name: str) -> str:
    start = html.index(f'<h2 id="{name}"')
    return html[start : html.index("<h2 ", start + 1)]


def test_quarantine_section_shows_top_reasons(own_data_report):
    lake, html = own_data_report
    section = _section_html(html, "quarantine")
    # 3 + 5 rows refused by the source, 2 by a model (one item, two perturbations).
    assert "shapes: 10 rows quarantined (9 items); the 5 most frequent of 7 reasons." in section
    cells = re.findall(r"<tr><td>(\w+)</td><td>([^<]*)</td><td>(\d+)</td><td>(\d+)</td>", section)
    assert cells[:2] == [
        ("read", "cannot read image: no such file", "3", "3"),
        ("embed", "CUDA out of memory", "2", "1"),
    ]
    assert len(cells) == 5 and all(c[0] == "validate" for c in cells[2:])
    assert "<td>efficientnet_lite0</td>" in section and "<td>the source</td>" in section
    query = "SELECT * FROM quarantine WHERE dataset = 'shapes'"
    command = f'vlray sql --lake {lake} "{query}"'
    assert html_escape(command) in section


def test_study_log_section_lists_what_did_not_run(own_data_report):
    _, html = own_data_report
    # Near the top: after the findings, before any study's numbers.
    assert html.index('id="findings"') < html.index('id="study_log"') < html.index('id="layerwise"')
    section = _section_html(html, "study_log")
    assert "Skipped, failed and small-n studies" in section
    assert "1 failed, 1 skipped, 1 small-n" in section
    rows = re.findall(r'<tr class="status-([\w-]+)">(.*?)</tr>', section)
    cells = [(cls, re.findall(r"<td>([^<]*)</td>", tr)) for cls, tr in rows]
    pair = f"{V} x {T}"
    assert cells == [
        (
            "failed",
            [DATASET, pair, "exemplar", "all metrics", "failed", "-", "ValueError: k=8 &gt; 4"],
        ),
        (
            "skipped",
            [DATASET, pair, "forced_choice", "all metrics", "skipped", "-", "no trials table"],
        ),
        (
            "small-n",
            [
                DATASET,
                pair,
                "layerwise",
                "cka",
                "small_n",
                "12",
                "scores from only 12 items; below the documented minimum of 50",
            ],
        ),
    ]


def test_study_log_and_quarantine_say_when_there_is_nothing(planted_report, tmp_path):
    _, index = planted_report
    html = index.read_text()  # a lake whose align predates the study log, nothing refused
    assert "Nothing was quarantined" in _section_html(html, "quarantine")
    assert "No study outcome is logged in this lake" in _section_html(html, "study_log")
    lake = Lake(make_lake(tmp_path / "lake", studies=("layerwise",)))
    _write_log(lake, "layerwise", [_log("layerwise", "written", n=192, rows=70)])
    intro = study_log_section(load(lake.uri)).intro
    assert intro.startswith("Every study ran on enough items: none of the 1 study outcomes")


def test_heatmaps_of_a_metric_share_one_colour_scale(own_data_report):
    lake, html = own_data_report
    maps = layerwise_heatmaps(load(lake))
    pretrained, control = maps[(DATASET, V, T, "cka")], maps[(DATASET, V, TR, "cka")]
    peak = _layer_value(V, T, NV - 1, NT - 1, True)
    assert np.nanmax(control.values) < 0.2 < peak
    assert pretrained.scale == control.scale == pytest.approx((0.0, peak))
    assert {hm.scale for key, hm in maps.items() if key[3] == "cka"} == {pretrained.scale}
    figures = [
        plots.heatmap_figure(
            hm.values, hm.vision_labels, hm.language_labels, None, "t", "cka", scale=hm.scale
        )
        for hm in (pretrained, control)
    ]
    clims = [fig.axes[0].images[0].get_clim() for fig in figures]
    assert clims[0] == clims[1] == pytest.approx((0.0, peak))
    # Every figure says so, with the numbers.
    note = f"one colour scale for every pair&#39;s cka heatmap: 0.00 to {fmt(peak)}"
    assert html.count(note) == 4
    # Axes: manifest layer names with relative depth; "layer i" where the manifest has none.
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "blocks.0 (0.00)",
        "blocks.1 (0.25)",
        "blocks.2 (0.50)",
        "blocks.3 (0.75)",
        "blocks.4 (1.00)",
    ]
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "encoder.layer.6 (1.00)"
    assert [t.get_text() for t in figures[1].axes[0].get_xticklabels()][:2] == [
        "layer 0 (0.00)",
        "layer 1 (0.17)",
    ]


def test_heatmap_scale_and_ticks_stay_readable():
    # Signed scores (rsa): one scale symmetric about 0 over every grid.
    signed = plots.colour_scale([np.array([[-0.1, 0.3]]), np.array([[0.05, np.nan]])])
    assert signed == pytest.approx((-0.3, 0.3))
    assert plots.colour_scale([np.array([[0.16]]), np.array([[0.62]])]) == (0.0, 0.62)
    # Many layers: at most 13 labelled ticks per axis, the first and last among them.
    names = [f"blocks.{i} ({i / 39:.2f})" for i in range(40)]
    fig = plots.heatmap_figure(
        np.random.default_rng(0).random((40, 40)), names, names, None, "t", "x"
    )
    for labels in (fig.axes[0].get_xticklabels(), fig.axes[0].get_yticklabels()):
        text = [t.get_text() for t in labels]
        assert 2 <= len(text) <= 13 and text[0] == names[0] and text[-1] == names[-1]
