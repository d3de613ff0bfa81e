"""`vlray report` and the headline findings, on synthetic alignment tables that follow the
studies' conventions: planted so that each finding holds, or planted against it."""

from __future__ import annotations

import datetime as dt
import math
import re

import numpy as np
import pytest
from PIL import Image

from vlray.lake import Lake
from vlray.report import FINDINGS, findings, write_report
from vlray.report.data import ReportError, fmt
from vlray.results import alignment_table

V, T = "efficientnet_lite0", "minilm_l6"  # the pretrained pair
VR, TR = "efficientnet_lite0_random", "minilm_l6_random"  # their random-init controls
NV, NT = 5, 7  # vision layers 0..4, language layers 0..6
DATASET = "shapes"
FAMILY_PERTURBATIONS = {
    "image_appearance": ["recolour_background"],
    "image_semantic": ["remove_object", "swap_attributes"],
    "text_appearance": ["typo"],
    "text_semantic": ["scramble_words"],
}
ALL_STUDIES = ("layerwise", "perturbation", "forced_choice", "exemplar", "concept_retrieval")
NOW = dt.datetime(2025, 1, 2, 3, 4, tzinfo=dt.UTC)


def _row(
    study,
    vision,
    language,
    vl,
    ll,
    metric,
    condition,
    value,
    lo=None,
    hi=None,
    null=None,
    p=None,
    n=192,
):
    return {
        "study": study,
        "dataset": DATASET,
        "vision_model": vision,
        "language_model": language,
        "vision_layer": vl,
        "language_layer": ll,
        "metric": metric,
        "condition": condition,
        "value": float(value),
        "ci_low": lo,
        "ci_high": hi,
        "null_mean": null,
        "p_value": p,
        "n": n,
        "run_id": f"run-{study}",
        "created_at": NOW,
    }


def _layer_value(vision, language, i, j, hold):
    """Planted layerwise score: grows with vision depth for the pretrained pair (hold), flat
    otherwise; controls stay low (hold) or beat the pretrained pair (against)."""
    control = vision in (VR,) or language in (TR,)
    if control:
        return 0.08 + 0.01 * i if hold else 0.9
    if hold:
        return 0.1 + 0.5 * (i / (NV - 1)) * (0.5 + 0.5 * j / (NT - 1))
    return 0.3


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


def build_rows(hold: bool, studies=ALL_STUDIES, control_fc: float = 0.5) -> dict[str, list]:
    pairs = [(V, T), (VR, T), (V, TR), (VR, TR)]
    out: dict[str, list] = {s: [] for s in studies}
    if "layerwise" in studies:
        for v, t in pairs:
            for metric in ("cka", "mutual_knn"):
                out["layerwise"] += _grid(
                    "layerwise",
                    v,
                    t,
                    metric,
                    "none",
                    lambda i, j, v=v, t=t: _layer_value(v, t, i, j, hold),
                    null=0.02,
                    p=0.001,
                )
    if "perturbation" in studies:
        for v, t in pairs[:2]:
            base = lambda i, j, v=v, t=t: _layer_value(v, t, i, j, True)  # noqa: E731
            out["perturbation"] += _grid("perturbation", v, t, "cka", "none", base)
            peak = (NV - 1, NT - 1)
            for family, names in FAMILY_PERTURBATIONS.items():
                semantic = family.endswith("semantic")
                drop = (0.3 if semantic else 0.02) if hold else (0.01 if semantic else 0.25)
                for name in names:
                    cond = f"{family}/{name}"
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
                            "cka_drop",
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
                        "cka_drop",
                        family,
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
                    for d in ("text_to_image", "image_to_text"):
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
                        f"k={k}/{side}",
                        lambda i, j, base=base, gain=gain: base * (i + 1) / NV + gain,
                        null=0.03,
                    )
    if "concept_retrieval" in studies:
        n_concepts = 200
        for v, t in pairs[:2]:
            good = (v, t) == (V, T) and hold
            for method in ("nn", "csls"):
                bins = [""] + [
                    f"/{b}={x}" for b in ("dispersion", "frequency") for x in ("low", "mid", "high")
                ]
                for suffix in bins:
                    for k in (1, 10, 100):
                        chance = k / n_concepts
                        value = min(0.97, (0.3 if good else 0.04) * math.sqrt(k)) + (
                            0.02 if method == "csls" else 0
                        )
                        if suffix.endswith("=high"):
                            value *= 0.5
                        out["concept_retrieval"].append(
                            _row(
                                "concept_retrieval",
                                v,
                                t,
                                NV - 1,
                                NT - 1,
                                f"p@{k}",
                                f"{method}{suffix}",
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
    lake = make_lake(root / "lake", hold=True)
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
    assert "at the deepest layer pair (vision layer 4 x language layer 6): text_to_image" in html
    assert "x chance" in html and "dispersion" in html and "frequency" in html
    # Header: lake, datasets, run ids.
    assert lake in html and "run-layerwise" in html and DATASET in html


def test_findings_hold_on_planted_data(planted_report):
    lake, _ = planted_report
    found = findings(lake)
    assert [f.name for f in found] == list(FINDINGS)
    for f in found:
        assert f.holds is True, f.line()
        assert (f.dataset, f.vision_model, f.language_model) == (DATASET, V, T)
        assert re.search(r"\d\.\d\d", f.text), f.text
    by = {f.name: f for f in found}
    assert by["depth"].metric == "cka"
    assert by["controls"].numbers["best_control"] < by["controls"].numbers["peak"]
    assert "CIs do not overlap" in by["exemplar"].text
    assert by["concept_retrieval"].numbers["ratio"] >= 3


def test_findings_do_not_hold_when_planted_against(tmp_path):
    lake = make_lake(tmp_path / "lake", hold=False)
    found = {f.name: f for f in findings(lake)}
    assert set(found) == set(FINDINGS)
    for f in found.values():
        assert f.holds is False, f.line()
    assert "not higher" in found["depth"].text  # flat depth profile
    assert found["depth"].numbers["deep_mean"] == pytest.approx(0.3)
    assert found["concept_retrieval"].numbers["ratio"] < 3
    # The report still renders, saying "does not hold".
    html = write_report(lake, tmp_path / "out").read_text()
    assert html.count('class="does-not-hold"') == len(FINDINGS)


def test_control_above_chance_is_stated(tmp_path):
    lake = make_lake(tmp_path / "lake", studies=("forced_choice",), control_fc=0.9)
    fc = next(f for f in findings(lake) if f.name == "forced_choice")
    assert fc.holds is True
    assert f"{VR} x {T}: text_to_image 0.90 ABOVE CHANCE" in fc.text


def test_missing_studies_say_not_run(tmp_path):
    lake = make_lake(tmp_path / "lake", studies=("layerwise",))
    found = {f.name: f for f in findings(lake)}
    assert found["depth"].holds is True and found["controls"].holds is True
    for name in ("semantic_vs_appearance", "forced_choice", "exemplar", "concept_retrieval"):
        assert found[name].holds is None and found[name].text.startswith("not run")
    index = write_report(lake, tmp_path / "out")
    html = index.read_text()
    for study in ("perturbation", "forced_choice", "exemplar", "concept_retrieval"):
        assert f"not run: the lake has no &#x27;{study}&#x27; results" in html
    assert html.count('class="not-run"') == 4
    assert {p.name.split("__")[0] for p in index.parent.glob("*.png")} == {"layerwise"}


def test_model_not_in_catalog_counts_as_pretrained(tmp_path):
    rows = build_rows(True, ("layerwise",))["layerwise"]
    for r in rows:
        r["vision_model"] = {V: "my_own_vit", VR: "my_own_vit_random"}[r["vision_model"]]
    Lake(str(tmp_path / "lake")).write_results(
        alignment_table(rows), {"study": "layerwise"}, "h", "run-test"
    )
    found = findings(str(tmp_path / "lake"))
    pairs = {(f.vision_model, f.language_model) for f in found}
    # Neither vision model is in the catalog: both count as pretrained; the random language
    # twin stays a control.
    assert pairs == {("my_own_vit", T), ("my_own_vit_random", T)}
    html = write_report(str(tmp_path / "lake"), tmp_path / "out").read_text()
    assert "not in catalog: taken as pretrained" in html


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
    assert f"cka peak {fmt(second)}" in found["controls"].text
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
    assert [f.holds for f in found] == [None] * len(FINDINGS)
    with pytest.raises(ReportError, match="no alignment results"):
        write_report(str(tmp_path / "lake"), tmp_path / "out")
