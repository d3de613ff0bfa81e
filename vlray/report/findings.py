"""The headline findings, computed from the alignment table without tuning.

One ``Finding`` per (finding, dataset, pretrained vision model, pretrained language model);
forced choice gives one per trial kind, and the size series one per (dataset, language model).
``holds`` is True or False with the numbers either way, or None when the inputs are missing
(the study was not run, or ran without what the finding needs). A finding whose direction
holds is "holds" only when its scores beat their null (where one exists, at p < ``ALPHA``)
and their intervals support the comparison; otherwise it is "not significant", with the
numbers. Small data sets (README: "Minimum sizes") usually end there.

Each finding names its rule, its layer selection and its controls (``Finding.rule``,
``.selection``, ``.controls``). Findings that compare different models or layers compare
null-calibrated scores (``calibrated`` = value - null mean, README "The results table"): raw
CKA or mutual kNN rise with width, depth and sample size even for unrelated data. Pretrained
pairs and controls are read at the same selections: the deepest layer pair, and each pair's
best layer pair, both reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vlray.items import trial_kind_order
from vlray.lake import Lake
from vlray.report.data import NoResultsError, ReportData, deepest_rows, fmt, fmt_ci, fmt_p, load
from vlray.results import Metric

FINDINGS = {
    "depth": "Alignment grows with vision depth",
    "controls": "Pretrained pair beats random-init controls",
    "size_series": "Alignment grows with the vision model's ImageNet accuracy",
    "semantic_vs_appearance": "Semantic perturbations cost more than appearance ones",
    "same_words": "A text change of meaning with the same words costs alignment",
    "forced_choice": "Forced choice well above chance",
    "forced_choice/lexical": "Forced choice above chance: lexical trials (a word differs)",
    "forced_choice/binding": "Forced choice above chance: binding trials (same words)",
    "forced_choice/relation": "Forced choice above chance: relation trials (same words)",
    "exemplar": "Averaging exemplars raises alignment",
    "concept_retrieval": "Concept retrieval P@10 at least 3x chance",
}
SELECTIONS = ("deepest", "best")  # layer selections, applied alike to pretrained and controls
# Text perturbations that change the meaning and keep every word: a bag of words cannot see them.
SAME_WORDS = ("text_semantic/role_swap", "text_semantic/scramble")
FAMILIES = ("image_appearance", "image_semantic", "text_appearance", "text_semantic")
SIDES = ("both", "image", "text", "unspecified")  # exemplar: the side preferred first
DIRECTIONS = ("text_to_image", "image_to_text")
ALPHA = 0.05  # a score beats its permutation null when p < ALPHA
FC_ALPHA = 0.01  # forced choice: p below this, with the CI's low end above chance
RETRIEVAL_FACTOR = 3.0  # concept retrieval: P@10 at least this many times chance
RETRIEVAL = Metric(top_k=10)  # concept retrieval: the precision the finding reads


@dataclass(frozen=True)
class Finding:
    name: str  # a key of FINDINGS
    holds: bool | None  # the predicted direction; None: inputs missing ("not run")
    text: str  # one line, with the numbers
    dataset: str | None = None
    vision_model: str | None = None
    language_model: str | None = None
    metric: str | None = None
    numbers: dict = field(default_factory=dict)
    # Whether the null and the intervals support the direction (False: "not significant").
    significant: bool = True
    rule: str = ""  # what is compared, and what makes it "holds"
    selection: str = ""  # which layers are read
    controls: str = ""  # what the controls are, and what they showed

    @property
    def title(self) -> str:
        return FINDINGS.get(self.name, self.name)

    @property
    def status(self) -> str:
        if self.holds and not self.significant:
            return "not significant"
        return {True: "holds", False: "does not hold", None: "not run"}[self.holds]

    @property
    def missing(self) -> bool:
        """The inputs are missing: the study (or what the finding needs) was not run."""
        return self.holds is None and self.text.startswith("not run")

    @property
    def pair(self) -> str:
        if self.vision_model is None:
            return ""
        return f"{self.vision_model} x {self.language_model}"

    def line(self) -> str:
        where = f" ({self.dataset}, {self.pair})" if self.dataset else ""
        return f"[{self.status}] {self.title}{where}: {self.text}"

    def details(self) -> list[str]:
        """The rule, the layer selection and the controls, one line each (those stated)."""
        parts = (("rule", self.rule), ("layers", self.selection), ("controls", self.controls))
        return [f"{name}: {text}" for name, text in parts if text]


def choose_metric(metrics, prefer: str | None = None) -> str | None:
    """The stated metric: ``prefer`` if present, else cka, else the first in name order."""
    metrics = sorted(set(metrics))
    for m in (prefer, "cka"):
        if m and m in metrics:
            return m
    return metrics[0] if metrics else None


def _of(rows: list[dict], dataset: str, vision: str, language: str, **eq) -> list[dict]:
    return [
        r
        for r in rows
        if r["dataset"] == dataset
        and r["vision_model"] == vision
        and r["language_model"] == language
        and all(r.get(k) == v for k, v in eq.items())
    ]


def _pair_metric(data: ReportData, dataset: str, vision: str, language: str) -> str | None:
    """The layerwise metric a pair's findings are stated on."""
    return choose_metric(r["metric"] for r in _of(data["grid"], dataset, vision, language))


def _ci_overlap(a: dict, b: dict) -> bool | None:
    if None in (a.get("ci_low"), a.get("ci_high"), b.get("ci_low"), b.get("ci_high")):
        return None
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


# --- 1. depth -----------------------------------------------------------------------------

DEPTH_RULE = (
    "mean calibrated score (value - null mean) over the deepest third of the vision layers "
    "above that of the shallowest third; significant when the deep band's median permutation "
    f"p < {ALPHA:g} and its mean CI low end, calibrated, is above the shallow band's calibrated "
    "mean"
)


def depth_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    metric = _pair_metric(data, dataset, vision, language)
    rows = _of(data["depth"], dataset, vision, language, metric=metric)
    stated = dict(
        rule=DEPTH_RULE,
        selection="bands of a third of the vision layers each, every language layer",
        controls="within one pair; the permutation null (the same layers with the pairing "
        "shuffled) stands in for unrelated data",
    )
    if not rows:
        return Finding("depth", None, "not run: no layerwise results", **key, **stated)
    r = rows[0]
    if r["vision_layers"] < 2:
        return Finding(
            "depth",
            None,
            f"{metric}: only one vision layer in the results",
            metric=metric,
            **key,
            **stated,
        )
    deep, shallow = r["deep_mean"], r["shallow_mean"]
    calibrated = r["deep_calibrated"] is not None and r["shallow_calibrated"] is not None
    # Without a null (no permutations) the raw means are compared, and the text says so.
    deep_c = r["deep_calibrated"] if calibrated else deep
    shallow_c = r["shallow_calibrated"] if calibrated else shallow
    holds = bool(deep_c > shallow_c)
    tests = []
    if r["deep_median_p"] is not None:
        tests.append(
            (
                r["deep_median_p"] < ALPHA,
                f"deep band's median p={fmt_p(r['deep_median_p'])}",
            )
        )
    if r["deep_ci_low"] is not None:
        low = r["deep_calibrated_ci_low"] if calibrated else r["deep_ci_low"]
        tests.append(
            (
                low > shallow_c,
                f"deep band's mean CI low end {fmt(low)} vs shallow {fmt(shallow_c)}",
            )
        )
    significant, why = _significance(tests)
    what = "calibrated" if calibrated else "raw (no permutation null to calibrate against)"
    text = (
        f"{metric}, {what}: deepest {r['band_layers']} of {r['vision_layers']} vision layers "
        f"{fmt(deep_c)} vs the shallowest {r['band_layers']} {fmt(shallow_c)} "
        f"({'higher' if holds else 'not higher'}, difference {fmt(deep_c - shallow_c)}; raw "
        f"{fmt(deep)} vs {fmt(shallow)}); {why}"
    )
    numbers = {
        "deep_mean": deep,
        "shallow_mean": shallow,
        "deep_calibrated": deep_c if calibrated else None,
        "shallow_calibrated": shallow_c if calibrated else None,
        "vision_layers": r["vision_layers"],
        "deep_median_p": r["deep_median_p"],
        "deep_ci_low": r["deep_ci_low"],
    }
    return Finding(
        "depth",
        holds,
        text,
        metric=metric,
        numbers=numbers,
        significant=significant,
        **key,
        **stated,
    )


def _significance(tests: list[tuple[bool, str]]) -> tuple[bool, str]:
    """Whether every test passes, and a clause saying which did not (or that none could be
    made: no null and no intervals, so nothing supports the direction)."""
    if not tests:
        return False, "no permutation null or bootstrap interval to test it against"
    failed = [what for ok, what in tests if not ok]
    if failed:
        return False, "not significant: " + "; ".join(failed)
    return True, "significant: " + "; ".join(what for _, what in tests)


# --- 2. controls, and the size series: calibrated scores across models ---------------------

SELECTION_TEXT = (
    "each pair read at its deepest layer pair and at its best layer pair (the highest "
    "calibrated score), the same two selections for every pair"
)


def _selected(data: ReportData, dataset: str, vision: str, language: str, metric: str) -> dict:
    """selection -> the pair's layerwise row at it (``report_layerwise_selected``)."""
    return {
        r["selection"]: r for r in _of(data["selected"], dataset, vision, language, metric=metric)
    }


def score_of(r: dict) -> float:
    """A row's calibrated score where it has a null, else its raw score."""
    return r["calibrated"] if r.get("calibrated") is not None else r["value"]


def score_ci(r: dict) -> tuple[float | None, float | None]:
    """The interval of ``score_of``: the bootstrap CI shifted by the null mean, or as is."""
    if r.get("calibrated") is not None:
        return r["calibrated_ci_low"], r["calibrated_ci_high"]
    return r["ci_low"], r["ci_high"]


def score_text(r: dict) -> str:
    """A selected row for a finding's line: the score, its CI, its layers and its tests."""
    lo, hi = score_ci(r)
    what = "calibrated" if r.get("calibrated") is not None else "raw (no null)"
    return (
        f"{what} {fmt(score_of(r))} {fmt_ci(lo, hi)} at vision layer {r['vision_layer']} x "
        f"language layer {r['language_layer']} (raw {fmt(r['value'])}, "
        f"z={fmt(r.get('z_score'))}, p={fmt_p(r.get('p_value'))})"
    )


def controls_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    metric = _pair_metric(data, dataset, vision, language)
    stated = dict(
        rule="the pretrained pair's calibrated score above every control pair's, at both "
        f"selections; significant when the pair beats its permutation null (p < {ALPHA:g}) "
        "and its calibrated CI clears every control's",
        selection=SELECTION_TEXT,
    )
    mine = _selected(data, dataset, vision, language, metric)
    if not mine:
        return Finding("controls", None, "not run: no layerwise results", **key, **stated)
    control_pairs = sorted(
        {
            (r["vision_model"], r["language_model"])
            for r in data["selected"]
            if r["dataset"] == dataset
            and r["metric"] == metric
            and (data.is_control(r["vision_model"]) or data.is_control(r["language_model"]))
        }
    )
    stated["controls"] = (
        ", ".join(f"{v} x {t}" for v, t in control_pairs) + " (random-init weights)"
        if control_pairs
        else "none on this dataset"
    )
    if not control_pairs:
        return Finding(
            "controls",
            None,
            f"not run: no pair with a random-init control on {dataset}",
            metric=metric,
            **key,
            **stated,
        )
    verdicts, tests, parts, numbers = [], [], [], {}
    for selection in SELECTIONS:
        r = mine.get(selection)
        if r is None:
            continue
        others = [
            (f"{v} x {t}", c[selection])
            for v, t in control_pairs
            if selection in (c := _selected(data, dataset, v, t, metric))
        ]
        best_name, best = max(others, key=lambda o: score_of(o[1]))
        verdicts.append(score_of(r) > score_of(best))
        lo, _ = score_ci(r)
        _, best_hi = score_ci(best)
        if r.get("p_value") is not None:
            tests.append((r["p_value"] < ALPHA, f"{selection}: p={fmt_p(r['p_value'])}"))
        if lo is not None and best_hi is not None:
            tests.append(
                (
                    lo > best_hi,
                    f"{selection}: CI {'clears' if lo > best_hi else 'overlaps'} "
                    f"the best control's",
                )
            )
        parts.append(f"{selection}: {score_text(r)} vs best control {best_name} {score_text(best)}")
        numbers[selection] = {"pair": score_of(r), **{n: score_of(o) for n, o in others}}
    holds = bool(verdicts) and all(verdicts)
    significant, why = _significance(tests)
    text = f"{metric}: " + "; ".join(parts) + f"; {why}"
    return Finding(
        "controls",
        holds,
        text,
        metric=metric,
        numbers=numbers,
        significant=significant,
        **key,
        **stated,
    )


def imagenet_top1(name: str) -> float | None:
    """A vision model's published ImageNet top-1 accuracy from the catalog (None: unknown)."""
    from vlray.catalog import CatalogError, get_spec

    try:
        return get_spec(name).imagenet_top1
    except CatalogError:
        return None


def size_series(
    data: ReportData, metric: str | None = None
) -> dict[tuple[str, str], list[tuple[float, str]]]:
    """(dataset, pretrained language model) -> its size series: the pretrained vision models
    with a known ImageNet accuracy and layerwise results (of ``metric``, if given) with it, as
    (accuracy, model) in accuracy order, then by name."""
    only = {} if metric is None else {"metric": metric}
    groups: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for dataset, vision, language in data.pretrained_pairs():
        top1 = imagenet_top1(vision)
        if top1 is not None and _of(data["selected"], dataset, vision, language, **only):
            groups.setdefault((dataset, language), []).append((top1, vision))
    return {key: sorted(members) for key, members in sorted(groups.items())}


def size_series_findings(data: ReportData) -> list[Finding]:
    """Per (dataset, pretrained language model): does the calibrated score grow with the
    pretrained vision models' ImageNet accuracy? Needs at least three such vision models."""
    out = []
    stated = dict(
        rule="calibrated score strictly increasing with ImageNet top-1 accuracy at both "
        "selections; significant when every member beats its permutation null "
        f"(p < {ALPHA:g}) and the most accurate model's calibrated CI lies above the least "
        "accurate one's",
        selection=SELECTION_TEXT,
        controls="the permutation null of each pair (calibration); no random-init control "
        "enters the series",
    )
    for (dataset, language), members in size_series(data).items():
        series = {vision: top1 for top1, vision in members}
        order = [vision for _, vision in members]
        key = dict(dataset=dataset, vision_model=" < ".join(order), language_model=language)
        if len(order) < 3:
            out.append(
                Finding(
                    "size_series",
                    None,
                    f"not run: needs three pretrained vision models with a known ImageNet "
                    f"accuracy, has {len(order)} ({', '.join(order)})",
                    **key,
                    **stated,
                )
            )
            continue
        metric = _pair_metric(data, dataset, order[0], language)
        verdicts, tests, parts, numbers = [], [], [], {}
        for selection in SELECTIONS:
            rows = [_selected(data, dataset, v, language, metric).get(selection) for v in order]
            if any(r is None for r in rows):
                continue
            scores = [score_of(r) for r in rows]
            verdicts.append(all(a < b for a, b in zip(scores, scores[1:], strict=False)))
            tests += [
                (r["p_value"] < ALPHA, f"{selection}: {v} p={fmt_p(r['p_value'])}")
                for v, r in zip(order, rows, strict=True)
                if r.get("p_value") is not None
            ]
            (lo, _), (_, hi) = score_ci(rows[-1]), score_ci(rows[0])
            if lo is not None and hi is not None:
                tests.append(
                    (
                        lo > hi,
                        f"{selection}: {order[-1]}'s CI "
                        f"{'above' if lo > hi else 'overlaps'} {order[0]}'s",
                    )
                )
            parts.append(
                f"{selection}: "
                + ", ".join(
                    f"{v} ({series[v]:g}%) {score_text(r)}"
                    for v, r in zip(order, rows, strict=True)
                )
            )
            numbers[selection] = dict(zip(order, scores, strict=True))
        if not verdicts:
            out.append(
                Finding(
                    "size_series",
                    None,
                    "not run: a member has no layerwise results",
                    **key,
                    **stated,
                )
            )
            continue
        holds = all(verdicts)
        significant, why = _significance(tests)
        text = f"{metric}: " + "; ".join(parts) + f"; {why}"
        out.append(
            Finding(
                "size_series",
                holds,
                text,
                metric=metric,
                numbers=numbers,
                significant=significant,
                **key,
                **stated,
            )
        )
    return out or [
        Finding(
            "size_series",
            None,
            "not run: no dataset has three pretrained vision models with a known ImageNet "
            "accuracy aligned with one language model",
            **stated,
        )
    ]


# --- 3. semantic vs appearance ------------------------------------------------------------


def _family_drop(rows: list[dict], family: str) -> tuple[dict | None, str]:
    """The family's pooled drop row; else the mean of its perturbations' drops (no CI)."""
    pooled = [r for r in rows if r["perturbation"] is None and r["family"] == family]
    if pooled:
        return pooled[0], ""
    parts = [r for r in rows if r["family"] == family and r["perturbation"] is not None]
    if not parts:
        return None, ""
    mean = sum(r["drop"] for r in parts) / len(parts)
    return {
        "drop": mean,
        "ci_low": None,
        "ci_high": None,
    }, f" (mean of {len(parts)}, no pooled row)"


DROP_SELECTION = (
    "the layer pair where the pair's unperturbed score peaks (the perturbation study's choice)"
)


def semantic_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    rows = _of(data["drops"], dataset, vision, language)
    metric = choose_metric(
        (r["metric"] for r in rows), prefer=_pair_metric(data, dataset, vision, language)
    )
    rows = [r for r in rows if r["metric"] == metric]
    key |= dict(
        rule="on each side, the pooled semantic drop (unperturbed minus perturbed score) above "
        "the pooled appearance drop; significant when the semantic drop's paired-bootstrap CI "
        "clears the appearance drop",
        selection=DROP_SELECTION,
        controls="the appearance perturbations (same meaning, changed form) are the control",
    )
    if not rows:
        return Finding("semantic_vs_appearance", None, "not run: no perturbation drops", **key)
    fam = {f: _family_drop(rows, f) for f in FAMILIES}
    parts, verdicts, numbers = [], [], {}
    significant, bits = True, []
    for side in ("image", "text"):
        sem, sem_note = fam[f"{side}_semantic"]
        app, app_note = fam[f"{side}_appearance"]
        if sem is None or app is None:
            missing = [f for f in (f"{side}_semantic", f"{side}_appearance") if fam[f][0] is None]
            parts.append(f"{side}: no {' or '.join(missing)} drops")
            verdicts.append(None)
            continue
        ok = bool(sem["drop"] > app["drop"])
        verdicts.append(ok)
        # Paired drops: the semantic drop's interval must clear the appearance drop.
        supported = sem["ci_low"] is not None and sem["ci_low"] > app["drop"]
        significant = significant and supported
        if ok and not supported:
            bits.append(f"{side}: the semantic drop's CI reaches the appearance drop")
        numbers[f"{side}_semantic"], numbers[f"{side}_appearance"] = sem["drop"], app["drop"]
        parts.append(
            f"{side} semantic {fmt(sem['drop'])} {fmt_ci(sem['ci_low'], sem['ci_high'])}{sem_note} "
            f"{'>' if ok else 'not >'} appearance {fmt(app['drop'])} "
            f"{fmt_ci(app['ci_low'], app['ci_high'])}{app_note}"
        )
    holds = False if False in verdicts else (None if None in verdicts else True)
    pair = rows[0]
    text = (
        f"{Metric(drop_of=metric).label} at vision layer {pair['vision_layer']} x language "
        f"layer "
        f"{pair['language_layer']}: " + "; ".join(parts)
    )
    if holds:
        text += "; " + ("not significant: " + "; ".join(bits) if bits else "significant")
    return Finding(
        "semantic_vs_appearance",
        holds,
        text,
        metric=metric,
        numbers=numbers,
        significant=significant,
        **key,
    )


def same_words_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    """Do text perturbations that change the meaning and keep every word (``SAME_WORDS``)
    cost alignment, beyond the text appearance perturbations? A bag of words cannot."""
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    metric = choose_metric(
        (r["metric"] for r in _of(data["drops"], dataset, vision, language)),
        prefer=_pair_metric(data, dataset, vision, language),
    )
    stated = dict(
        rule=f"the drop of {SAME_WORDS[0]} (same words, roles exchanged) above the pooled "
        "text appearance drop; significant when its paired-bootstrap CI clears it",
        selection=DROP_SELECTION,
    )

    def drops(v: str, t: str) -> tuple[dict, dict | None]:
        rows = [r for r in _of(data["drops"], dataset, v, t) if r["metric"] == metric]
        return {r["perturbation"]: r for r in rows if r["perturbation"]}, _family_drop(
            rows, "text_appearance"
        )[0]

    mine, appearance = drops(vision, language)
    controls = sorted(
        {
            (r["vision_model"], r["language_model"])
            for r in data["drops"]
            if r["dataset"] == dataset
            and (data.is_control(r["vision_model"]) or data.is_control(r["language_model"]))
        }
    )
    stated["controls"] = (
        "the text appearance perturbations; "
        + (", ".join(f"{v} x {t}" for v, t in controls) + " (random-init) at their own peak")
        if controls
        else "the text appearance perturbations"
    )
    target = mine.get(SAME_WORDS[0])
    if target is None or appearance is None:
        return Finding(
            "same_words",
            None,
            f"not run: no {SAME_WORDS[0]} drop or no text appearance drop",
            **key,
            **stated,
        )
    holds = bool(target["drop"] > appearance["drop"])
    tests = []
    if target["ci_low"] is not None:
        tests.append(
            (
                target["ci_low"] > appearance["drop"],
                f"CI low end {fmt(target['ci_low'])} vs appearance {fmt(appearance['drop'])}",
            )
        )
    significant, why = _significance(tests)

    def listed(rows: dict) -> str:
        return ", ".join(
            f"{p.split('/', 1)[1]} {fmt(rows[p]['drop'])} "
            f"{fmt_ci(rows[p]['ci_low'], rows[p]['ci_high'])}"
            for p in SAME_WORDS
            if p in rows
        )

    text = (
        f"{Metric(drop_of=metric).label} at vision layer {target['vision_layer']} x language "
        f"layer {target['language_layer']}: {listed(mine)} vs text appearance (pooled) "
        f"{fmt(appearance['drop'])} {fmt_ci(appearance['ci_low'], appearance['ci_high'])}; {why}"
    )
    for v, t in controls:
        theirs, _ = drops(v, t)
        if any(p in theirs for p in SAME_WORDS):
            text += f"; control {v} x {t}: {listed(theirs)}"
    numbers = {p: mine[p]["drop"] for p in SAME_WORDS if p in mine}
    numbers["text_appearance"] = appearance["drop"]
    return Finding(
        "same_words",
        holds,
        text,
        metric=metric,
        numbers=numbers,
        significant=significant,
        **key,
        **stated,
    )


# --- 4. forced choice, per trial kind ------------------------------------------------------


def _p_value(r: dict) -> float | None:
    """The row's one-sided binomial p-value, computed from accuracy and n when not stored."""
    if r.get("p_value") is not None and not math.isnan(r["p_value"]):
        return r["p_value"]
    if not r.get("n"):
        return None
    from scipy.stats import binomtest

    hits = int(round(r["accuracy"] * r["n"]))
    return float(binomtest(hits, r["n"], r["chance"], alternative="greater").pvalue)


def _above_chance(r: dict) -> bool:
    p = _p_value(r)
    return r["ci_low"] is not None and r["ci_low"] > r["chance"] and p is not None and p < FC_ALPHA


def _fc_text(r: dict) -> str:
    return (
        f"{r['direction']} {fmt(r['accuracy'])} {fmt_ci(r['ci_low'], r['ci_high'])} "
        f"p={fmt_p(_p_value(r))} n={r['n']}"
    )


def _direction_order(r: dict) -> tuple:
    d = r["direction"]
    return (DIRECTIONS.index(d) if d in DIRECTIONS else len(DIRECTIONS), d)


def _fc_name(kind: str | None) -> str:
    return "forced_choice" if kind is None else f"forced_choice/{kind}"


FC_RULE = (
    f"accuracy above chance in both directions at the deepest layer pair; significant when "
    f"each direction's binomial p < {FC_ALPHA:g} and its Wilson CI lies above chance"
)
FC_SELECTION = (
    "the deepest layer pair (the verdict), and each pair's best layer pair for that kind and "
    "direction (chosen on the same trials: optimistic), the same for every pair"
)


def forced_choice_findings(
    data: ReportData, dataset: str, vision: str, language: str
) -> list[Finding]:
    """One finding per trial kind of the pair's forced-choice rows (lexical, binding,
    relation; trials without a kind as one "forced_choice" finding), controls beside it."""
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    mine = _of(data["forced_choice"], dataset, vision, language)
    if not mine:
        return [
            Finding(
                "forced_choice",
                None,
                "not run: no forced-choice results",
                rule=FC_RULE,
                selection=FC_SELECTION,
                **key,
            )
        ]
    kinds = sorted({r["trial_kind"] for r in mine}, key=trial_kind_order)
    controls = [
        r
        for r in data["forced_choice"]
        if r["dataset"] == dataset
        and (data.is_control(r["vision_model"]) or data.is_control(r["language_model"]))
    ]
    return [_forced_choice_finding(mine, controls, kind, key) for kind in kinds]


def _forced_choice_finding(mine: list[dict], controls: list[dict], kind, key: dict) -> Finding:
    at = {
        s: {r["direction"]: r for r in mine if r["trial_kind"] == kind and r["selection"] == s}
        for s in SELECTIONS
    }
    rows = at["deepest"]
    first = next(iter(rows.values()))
    # Direction: above chance; significant: the binomial test and the interval agree.
    verdicts = [rows[d]["accuracy"] > rows[d]["chance"] if d in rows else None for d in DIRECTIONS]
    holds = False if False in verdicts else (None if None in verdicts else True)
    significant = all(_above_chance(rows[d]) for d in DIRECTIONS if d in rows)
    parts = [_fc_text(rows[d]) if d in rows else f"{d} not run" for d in DIRECTIONS]
    parts += [
        _fc_text(r)
        for r in sorted(rows.values(), key=_direction_order)
        if r["direction"] not in DIRECTIONS
    ]
    text = (
        f"deepest layer pair (vision layer {first['vision_layer']} x language layer "
        f"{first['language_layer']}), chance {fmt(first['chance'])}: " + ", ".join(parts)
    )
    best = sorted(at["best"].values(), key=_direction_order)
    if best:
        text += "; best layer pair: " + ", ".join(
            f"{r['direction']} {fmt(r['accuracy'])} at ({r['vision_layer']}, {r['language_layer']})"
            for r in best
        )
    by_pair: dict[str, list[dict]] = {}
    for r in controls:
        if r["trial_kind"] == kind:
            by_pair.setdefault(f"{r['vision_model']} x {r['language_model']}", []).append(r)
    passing = []
    if by_pair:
        bits = []
        for name, rs in sorted(by_pair.items()):
            deepest = [r for r in rs if r["selection"] == "deepest"]
            best_of = {r["direction"]: r for r in rs if r["selection"] == "best"}
            if any(_above_chance(r) for r in deepest):
                passing.append(name)
            accs = ", ".join(
                f"{r['direction']} {fmt(r['accuracy'])}"
                + (" ABOVE CHANCE" if _above_chance(r) else "")
                + (
                    f" (best {fmt(best_of[r['direction']]['accuracy'])})"
                    if r["direction"] in best_of
                    else ""
                )
                for r in sorted(deepest, key=_direction_order)
            )
            bits.append(f"{name}: {accs}")
        text += "; controls at the deepest pair: " + "; ".join(bits)
        if passing:
            text += (
                f"; a random-init control passes these trials too ({', '.join(passing)}): "
                "they can be passed without learned alignment"
            )
        controls_text = ", ".join(sorted(by_pair)) + " (random-init), read at the same layers"
    else:
        text += "; no random-init control pair has forced-choice results"
        controls_text = "none on this dataset"
    numbers = {d: rows[d]["accuracy"] for d in rows}
    numbers["best"] = {r["direction"]: r["accuracy"] for r in best}
    numbers["controls"] = {
        name: {r["direction"]: r["accuracy"] for r in rs if r["selection"] == "deepest"}
        for name, rs in by_pair.items()
    }
    numbers["controls_above_chance"] = passing
    if holds and not significant:
        text += f"; not significant (needs p < {FC_ALPHA:g} and the CI above chance)"
    return Finding(
        _fc_name(kind),
        holds,
        text,
        metric="accuracy",
        numbers=numbers,
        significant=significant,
        rule=FC_RULE,
        selection=FC_SELECTION,
        controls=controls_text,
        **key,
    )


# --- 5. exemplar --------------------------------------------------------------------------


def exemplar_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    key |= dict(
        rule="the score with the most exemplars averaged per concept (largest k) above k=1, on "
        "the side averaged first (both, image, text); significant when the draws' intervals do "
        "not overlap",
        selection="the layer pair the exemplar study scored",
        controls="k=1 (one exemplar per concept, no averaging) is the baseline",
    )
    rows = _of(data["exemplar"], dataset, vision, language)
    # Concept-level scores have few rows (one per concept); biased CKA's null sits far above 0
    # there and moves with k, so the unbiased estimator states this finding when present.
    metrics = {r["metric"] for r in rows}
    prefer = "unbiased_cka" if "unbiased_cka" in metrics else None
    metric = choose_metric(metrics, prefer=prefer or _pair_metric(data, dataset, vision, language))
    rows = [r for r in rows if r["metric"] == metric]
    if not rows:
        return Finding("exemplar", None, "not run: no exemplar results", **key)
    present = {r["side"] for r in rows}
    side = next((s for s in SIDES if s in present), min(present))
    curve = {r["k"]: r for r in rows if r["side"] == side}
    kmax = max(curve)
    if 1 not in curve or kmax == 1:
        return Finding(
            "exemplar",
            None,
            f"{metric} on the {side} side: needs k=1 and a larger k, has k={sorted(curve)}",
            metric=metric,
            **key,
        )
    one, top = curve[1], curve[kmax]
    holds = bool(top["value"] > one["value"])
    overlap = _ci_overlap(one, top)
    note = {None: "no CIs", True: "CIs overlap", False: "CIs do not overlap"}[overlap]
    text = (
        f"{metric} with exemplars averaged on side '{side}', at vision layer "
        f"{one['vision_layer']} x language layer {one['language_layer']}: "
        f"k={kmax} {fmt(top['value'])} {fmt_ci(top['ci_low'], top['ci_high'])} "
        f"vs k=1 {fmt(one['value'])} {fmt_ci(one['ci_low'], one['ci_high'])} ({note})"
    )
    numbers = {"side": side, "k1": one["value"], "kmax": kmax, "value_kmax": top["value"]}
    numbers["ci_overlap"] = overlap
    significant = overlap is False
    if holds and not significant:
        text += "; not significant: the intervals of the draws overlap"
    return Finding(
        "exemplar", holds, text, metric=metric, numbers=numbers, significant=significant, **key
    )


# --- 6. concept retrieval -----------------------------------------------------------------


def retrieval_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    key |= dict(
        rule=f"nearest-neighbour P@10 at least {RETRIEVAL_FACTOR:g}x chance; significant when "
        f"p < {ALPHA:g} with the concepts shuffled and the CI's low end is above chance",
        selection="the deepest layer pair",
        controls="chance (10 random words include an alias) and the concept-shuffle null",
    )
    rows = _of(data["retrieval"], dataset, vision, language, method="nn", breakdown="overall")
    rows = deepest_rows([r for r in rows if r["at_k"] == RETRIEVAL.top_k])
    if not rows:
        return Finding("concept_retrieval", None, "not run: no nn P@10 results", **key)
    r = rows[0]
    where = f"vision layer {r['vision_layer']} x language layer {r['language_layer']}"
    if not r["chance"]:
        return Finding(
            "concept_retrieval",
            None,
            f"nn P@10 {fmt(r['value'])} at {where}, but no chance level recorded",
            metric=RETRIEVAL.label,
            **key,
        )
    ratio = r["value"] / r["chance"]
    holds = bool(ratio >= RETRIEVAL_FACTOR)
    text = (
        f"nn P@10 {fmt(r['value'])} {fmt_ci(r['ci_low'], r['ci_high'])} vs chance "
        f"{fmt(r['chance'])}: {ratio:.1f}x (needs {RETRIEVAL_FACTOR:g}x), at {where}, "
        f"n={r['n']} concepts"
    )
    numbers = {RETRIEVAL.label: r["value"], "chance": r["chance"], "ratio": ratio}
    tests = []
    if r.get("p_value") is not None:
        tests.append((r["p_value"] < ALPHA, f"p={fmt_p(r['p_value'])} (concepts shuffled)"))
    if r.get("ci_low") is not None:
        tests.append((r["ci_low"] > r["chance"], f"CI low end {fmt(r['ci_low'])} vs chance"))
    significant, why = _significance(tests)
    text += f"; {why}"
    return Finding(
        "concept_retrieval",
        holds,
        text,
        metric=RETRIEVAL.label,
        numbers=numbers,
        significant=significant,
        **key,
    )


# The findings in their order: one rule per pretrained pair (forced choice: a finding per trial
# kind), and the size series across pairs.
RULES = {
    "depth": depth_finding,
    "controls": controls_finding,
    "size_series": size_series_findings,
    "semantic_vs_appearance": semantic_finding,
    "same_words": same_words_finding,
    "forced_choice": forced_choice_findings,
    "exemplar": exemplar_finding,
    "concept_retrieval": retrieval_finding,
}
ACROSS_PAIRS = {"size_series"}  # rules over every pair at once (``rule(data)``)


def findings(lake: Lake | str | ReportData) -> list[Finding]:
    """The headline findings for every (dataset, pretrained vision model, pretrained language
    model) in the lake's results, grouped by finding, and the size series. With no pretrained
    pair (or no results at all) each rule gives one finding, not run."""
    if isinstance(lake, ReportData):
        data = lake
    else:
        try:
            data = load(lake)
        except NoResultsError as err:
            return [Finding(name, None, f"not run: {err}") for name in RULES]
    pairs = data.pretrained_pairs()
    if not pairs:
        why = "not run: no pair of two pretrained models in the results"
        return [Finding(name, None, why) for name in RULES]
    out: list[Finding] = []
    for name, rule in RULES.items():
        found: list[Finding] = []
        for f in [rule(data)] if name in ACROSS_PAIRS else [rule(data, *p) for p in pairs]:
            found += f if isinstance(f, list) else [f]
        # A pair that did not run a study (align.model_studies) says nothing about it when
        # another pair did; "not run" is kept when no pair ran it.
        ran = [f for f in found if not f.missing]
        out += ran or found[:1] if name not in ACROSS_PAIRS else found
    return out
