"""The headline findings, computed from the alignment table without tuning.

One ``Finding`` per (finding, dataset, pretrained vision model, pretrained language model):
``holds`` is True or False with the numbers either way, or None when the inputs are missing
(the study was not run, or ran without what the finding needs). A finding whose direction
holds is "holds" only when its scores beat their permutation null (where one exists, at
p < ``ALPHA``) and their intervals support the comparison; otherwise it is "not significant",
with the numbers. Small data sets (README: "Minimum sizes") usually end there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vlray.lake import Lake
from vlray.report.data import NoResultsError, ReportData, deepest_rows, fmt, fmt_ci, fmt_p, load
from vlray.results import Metric

FINDINGS = {
    "depth": "Alignment grows with vision depth",
    "controls": "Pretrained pair beats random-init controls",
    "semantic_vs_appearance": "Semantic perturbations cost more than appearance ones",
    "forced_choice": "Forced choice well above chance",
    "exemplar": "Averaging exemplars raises alignment",
    "concept_retrieval": "Concept retrieval P@10 at least 3x chance",
}
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

    @property
    def title(self) -> str:
        return FINDINGS.get(self.name, self.name)

    @property
    def status(self) -> str:
        if self.holds and not self.significant:
            return "not significant"
        return {True: "holds", False: "does not hold", None: "not run"}[self.holds]

    @property
    def pair(self) -> str:
        if self.vision_model is None:
            return ""
        return f"{self.vision_model} x {self.language_model}"

    def line(self) -> str:
        where = f" ({self.dataset}, {self.pair})" if self.dataset else ""
        return f"[{self.status}] {self.title}{where}: {self.text}"


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


def depth_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    metric = _pair_metric(data, dataset, vision, language)
    rows = _of(data["depth"], dataset, vision, language, metric=metric)
    if not rows:
        return Finding("depth", None, "not run: no layerwise results", **key)
    r = rows[0]
    if r["vision_layers"] < 2:
        return Finding(
            "depth", None, f"{metric}: only one vision layer in the results", metric=metric, **key
        )
    deep, shallow = r["deep_mean"], r["shallow_mean"]
    holds = bool(deep > shallow)
    tests = []
    if r["deep_median_p"] is not None:
        tests.append(
            (
                r["deep_median_p"] < ALPHA,
                f"deep band's median p={fmt_p(r['deep_median_p'])} against a null mean of "
                f"{fmt(r['deep_null_mean'])}",
            )
        )
    if r["deep_null_mean"] is not None and r["shallow_null_mean"] is not None:
        excess = deep - r["deep_null_mean"], shallow - r["shallow_null_mean"]
        tests.append(
            (
                excess[0] > excess[1],
                f"above the null by {fmt(excess[0])} (deep) vs {fmt(excess[1])} (shallow)",
            )
        )
    if r["deep_ci_low"] is not None:
        tests.append(
            (
                r["deep_ci_low"] > shallow,
                f"deep band's mean CI low end {fmt(r['deep_ci_low'])} vs shallow {fmt(shallow)}",
            )
        )
    significant, why = _significance(tests)
    text = (
        f"{metric}: mean over the deepest {r['band_layers']} of {r['vision_layers']} vision "
        f"layers (all language layers) {fmt(deep)} vs the shallowest {r['band_layers']} "
        f"{fmt(shallow)} ({'higher' if holds else 'not higher'}, difference "
        f"{fmt(deep - shallow)}); {why}"
    )
    numbers = {
        "deep_mean": deep,
        "shallow_mean": shallow,
        "vision_layers": r["vision_layers"],
        "deep_median_p": r["deep_median_p"],
        "deep_ci_low": r["deep_ci_low"],
    }
    return Finding(
        "depth", holds, text, metric=metric, numbers=numbers, significant=significant, **key
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


# --- 2. controls --------------------------------------------------------------------------


def controls_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    metric = _pair_metric(data, dataset, vision, language)
    mine = _of(data["peaks"], dataset, vision, language, metric=metric)
    if not mine:
        return Finding("controls", None, "not run: no layerwise results", **key)
    peak = mine[0]
    controls = [
        r
        for r in data["peaks"]
        if r["dataset"] == dataset
        and r["metric"] == metric
        and (data.is_control(r["vision_model"]) or data.is_control(r["language_model"]))
    ]
    head = (
        f"{metric} peak {fmt(peak['value'])} {fmt_ci(peak['ci_low'], peak['ci_high'])} at "
        f"vision layer {peak['vision_layer']} x language layer {peak['language_layer']}"
    )
    if not controls:
        return Finding(
            "controls",
            None,
            f"not run: no pair with a random-init control on {dataset} ({head})",
            metric=metric,
            **key,
        )
    best = max(controls, key=lambda r: r["value"])
    holds = bool(peak["value"] > best["value"])
    overlap = _ci_overlap(peak, best)
    tests = []
    if peak.get("p_value") is not None:
        tests.append((peak["p_value"] < ALPHA, f"peak p={fmt_p(peak['p_value'])}"))
    if overlap is not None:
        tests.append((not overlap, "CIs overlap" if overlap else "CIs do not overlap"))
    significant, why = _significance(tests)
    text = (
        f"{head}; highest of {len(controls)} control pair peaks {fmt(best['value'])} "
        f"{fmt_ci(best['ci_low'], best['ci_high'])} ({best['vision_model']} x "
        f"{best['language_model']}, vision layer {best['vision_layer']} x language layer "
        f"{best['language_layer']}); {why}"
    )
    numbers = {
        "peak": peak["value"],
        "best_control": best["value"],
        "controls": {f"{r['vision_model']} x {r['language_model']}": r["value"] for r in controls},
    }
    return Finding(
        "controls", holds, text, metric=metric, numbers=numbers, significant=significant, **key
    )


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


def semantic_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    rows = _of(data["drops"], dataset, vision, language)
    metric = choose_metric(
        (r["metric"] for r in rows), prefer=_pair_metric(data, dataset, vision, language)
    )
    rows = [r for r in rows if r["metric"] == metric]
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


# --- 4. forced choice ---------------------------------------------------------------------


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


def forced_choice_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
    rows = {r["direction"]: r for r in _of(data["forced_choice"], dataset, vision, language)}
    if not rows:
        return Finding("forced_choice", None, "not run: no forced-choice results", **key)
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
        f"at the deepest layer pair (vision layer {first['vision_layer']} x language layer "
        f"{first['language_layer']}), chance {fmt(first['chance'])}: " + ", ".join(parts)
    )
    controls = [
        r
        for r in data["forced_choice"]
        if r["dataset"] == dataset
        and (data.is_control(r["vision_model"]) or data.is_control(r["language_model"]))
    ]
    by_pair: dict[str, list[dict]] = {}
    for r in controls:
        by_pair.setdefault(f"{r['vision_model']} x {r['language_model']}", []).append(r)
    if by_pair:
        bits = []
        for name, rs in sorted(by_pair.items()):
            accs = ", ".join(
                f"{r['direction']} {fmt(r['accuracy'])}"
                + (" ABOVE CHANCE" if _above_chance(r) else "")
                for r in sorted(rs, key=_direction_order)
            )
            bits.append(f"{name}: {accs}")
        text += "; controls: " + "; ".join(bits)
    else:
        text += "; no random-init control pair has forced-choice results"
    numbers = {d: rows[d]["accuracy"] for d in rows}
    numbers["controls"] = {
        name: {r["direction"]: r["accuracy"] for r in rs} for name, rs in by_pair.items()
    }
    if holds and not significant:
        text += f"; not significant (needs p < {FC_ALPHA:g} and the CI above chance)"
    return Finding(
        "forced_choice",
        holds,
        text,
        metric="accuracy",
        numbers=numbers,
        significant=significant,
        **key,
    )


# --- 5. exemplar --------------------------------------------------------------------------


def exemplar_finding(data: ReportData, dataset: str, vision: str, language: str) -> Finding:
    key = dict(dataset=dataset, vision_model=vision, language_model=language)
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


RULES = {
    "depth": depth_finding,
    "controls": controls_finding,
    "semantic_vs_appearance": semantic_finding,
    "forced_choice": forced_choice_finding,
    "exemplar": exemplar_finding,
    "concept_retrieval": retrieval_finding,
}


def findings(lake: Lake | str | ReportData) -> list[Finding]:
    """The six headline findings for every (dataset, pretrained vision model, pretrained
    language model) in the lake's results, grouped by finding. With no pretrained pair (or no
    results at all) each finding is returned once, not run."""
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
    return [rule(data, *pair) for rule in RULES.values() for pair in pairs]
