"""One report section per study: its figures (PNG), the numbers behind each (a table and a
CSV beside the PNG) and a one-line reading computed from those numbers; before them, the
sections of what did not run (the study log) and what was refused (the quarantine)."""

from __future__ import annotations

import csv
import multiprocessing
import os
import re
import shlex
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlray.items import TOP_QUARANTINE_REASONS, trial_kind_order
from vlray.report import plots
from vlray.report.data import STUDY_TITLES, ReportData, deepest_rows, fmt, fmt_ci, fmt_p
from vlray.report.findings import RETRIEVAL
from vlray.sql import sql_command

BIN_ORDER = {"low": 0, "rare": 0, "mid": 1, "medium": 1, "high": 2, "frequent": 2}


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    classes: list[str] | None = None  # a CSS class per row ("" for none)
    code: str = ""  # a command shown under the table (how to list the rows behind it)


@dataclass
class Figure:
    title: str
    png: str  # file name in the report folder
    reading: str  # one line computed from the numbers
    csv: str | None = None
    table: Table | None = None


@dataclass
class Section:
    study: str  # the study, or the lake table a section that is no study reads
    ran: bool
    intro: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    heading: str = ""  # the title of a section that is no study

    @property
    def title(self) -> str:
        return self.heading or STUDY_TITLES.get(self.study, self.study)


def slug(*parts: str) -> str:
    """A file name from parts, joined by '__' so that model names with '_' stay apart."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "__".join(str(p) for p in parts)).strip("-")


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _groups(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _ordered(data: ReportData, groups: dict[tuple, list[dict]]) -> list[tuple]:
    """Group keys (dataset, vision, language, ...): pretrained pairs first, controls after."""
    return sorted(groups, key=lambda k: (k[0], data.is_control(k[1]) or data.is_control(k[2]), k))


def pair_label(data: ReportData, vision: str, language: str) -> str:
    controls = [m for m in (vision, language) if data.is_control(m)]
    tag = f" (control: {', '.join(controls)} random-init)" if controls else ""
    return f"{vision} x {language}{tag}"


def short_pair(data: ReportData, vision: str, language: str) -> str:
    """The pair for a figure title: controls flagged, without the explanation."""
    return f"{vision} x {language}" + (
        " (random-init control)" if data.is_control(vision) or data.is_control(language) else ""
    )


def _add_figure(
    section: Section,
    out: Path,
    name: str,
    title: str,
    reading: str,
    rows: list[dict],
    columns: list[str],
    cells: list[list[str]],
) -> None:
    """Append a figure whose PNG is drawn as ``name.png``: its rows go to ``name.csv`` and a
    table of ``columns`` x ``cells`` shows them beside the reading."""
    write_csv(out / f"{name}.csv", rows)
    section.figures.append(
        Figure(title, f"{name}.png", reading, f"{name}.csv", Table(columns, cells))
    )


def _not_run(study: str) -> Section:
    return Section(study, False, f"not run: the lake has no '{study}' results")


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- what did not run, and what was refused -----------------------------------------------

STUDY_LOG_CLASSES = {
    "failed": "status-failed",
    "skipped": "status-skipped",
    "small_n": "status-small-n",
}


def study_log_section(data: ReportData) -> Section:
    """The studies whose latest run was skipped, failed or scored too few items (the lake's
    ``study_log`` table, sql/report_study_log.sql): read before any number of the report."""
    section = Section("study_log", True, heading="Skipped, failed and small-n studies")
    rows = data["study_log"]
    logged = sum(int(r["outcomes"]) for r in data["study_log_counts"])
    if not rows:
        section.intro = (
            f"Every study ran on enough items: none of the {logged} study outcomes logged by "
            "the latest align runs was skipped, failed or small-n."
            if logged
            else "No study outcome is logged in this lake (its align runs predate the "
            "study_log table, or none ran): re-run `vlray align` to record which studies were "
            "skipped, failed or ran on too few items."
        )
        return section
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    section.intro = (
        "The latest align run of these studies did not simply write their scores: "
        + ", ".join(f"{counts[s]} {s.replace('_', '-')}" for s in sorted(counts))
        + ". Skipped: nothing written (the reason says why); failed: an error, nothing "
        "written; small-n: scores written from fewer items than the study's documented "
        "minimum, so read them as a warning. 'all metrics' is the whole study."
    )
    section.tables.append(
        Table(
            ["dataset", "model pair", "study", "metric", "status", "n", "reason"],
            [
                [
                    r["dataset"],
                    pair_label(data, r["vision_model"], r["language_model"]),
                    r["study"],
                    r["metric"] or "all metrics",
                    r["status"],
                    "-" if r["n"] is None else str(r["n"]),
                    r["reason"] or "-",
                ]
                for r in rows
            ],
            "From the study_log table (sql/report_study_log.sql): the latest outcome of each "
            "study per model pair, rows whose status is not 'written'.",
            [STUDY_LOG_CLASSES.get(r["status"], "") for r in rows],
            f"vlray sql --lake {shlex.quote(data.lake)} --file report_study_log",
        )
    )
    return section


def quarantine_section(data: ReportData) -> Section:
    """Per dataset, the rows refused while reading, decoding, validating or embedding, with
    the most frequent reasons (the lake's ``quarantine`` table, sql/report_quarantine.sql)."""
    section = Section("quarantine", True, heading="Quarantined rows")
    groups = _groups(data["quarantine"], "dataset")
    if not groups:
        section.intro = "Nothing was quarantined: no row of any dataset was refused."
        return section
    section.intro = (
        "Rows refused by a source (read, decode, validate) or by a model (embed) are left out "
        "of every score. Per dataset: how many, and the most frequent reasons by stage."
    )
    for (dataset,) in sorted(groups):
        rows = groups[(dataset,)]
        first = rows[0]
        top = rows[:TOP_QUARANTINE_REASONS]
        shown = (
            f"the {len(top)} most frequent of {first['dataset_reasons']} reasons"
            if len(rows) > len(top)
            else "every reason"
        )
        section.tables.append(
            Table(
                ["stage", "reason", "rows", "items", "refused by"],
                [
                    [
                        r["stage"],
                        r["reason"] or "-",
                        str(r["rows"]),
                        str(r["items"]),
                        ", ".join(
                            (["the source"] if r["by_source"] else [])
                            + ([r["models"]] if r["models"] else [])
                        ),
                    ]
                    for r in top
                ],
                f"{dataset}: {first['dataset_rows']} rows quarantined ({first['dataset_items']} "
                f"items); {shown}.",
                code=sql_command(
                    data.lake, f"SELECT * FROM quarantine WHERE dataset = {_sql_literal(dataset)}"
                ),
            )
        )
    return section


# --- layerwise ----------------------------------------------------------------------------


@dataclass
class Heatmap:
    """One layerwise grid as drawn: scores [vision layer, language layer] (NaN where missing),
    the layers of its rows and columns with their axis labels (manifest name and relative
    depth), and the colour scale every heatmap of its metric shares."""

    values: np.ndarray
    vision_layers: list[int]
    language_layers: list[int]
    vision_labels: list[str]
    language_labels: list[str]
    scale: tuple[float, float] = (0.0, 1.0)


def layerwise_heatmaps(data: ReportData) -> dict[tuple[str, str, str, str], Heatmap]:
    """(dataset, vision model, language model, metric) -> its heatmap; the heatmaps of one
    metric share one (vmin, vmax) over every model pair and dataset (plots.colour_scale), so
    that a colour means the same score in each."""
    maps = {}
    for key, rows in _groups(
        data["grid"], "dataset", "vision_model", "language_model", "metric"
    ).items():
        dataset, vision, language, _ = key
        v_layers = sorted({r["vision_layer"] for r in rows})
        l_layers = sorted({r["language_layer"] for r in rows})
        grid = np.full((len(v_layers), len(l_layers)), np.nan)
        vi = {x: i for i, x in enumerate(v_layers)}
        li = {x: j for j, x in enumerate(l_layers)}
        for r in rows:
            grid[vi[r["vision_layer"]], li[r["language_layer"]]] = _val(r["value"])
        maps[key] = Heatmap(
            grid,
            v_layers,
            l_layers,
            [data.layer_label(dataset, "vision", vision, i) for i in v_layers],
            [data.layer_label(dataset, "language", language, j) for j in l_layers],
        )
    by_metric: dict[str, list[Heatmap]] = defaultdict(list)
    for key, hm in maps.items():
        by_metric[key[3]].append(hm)
    for hms in by_metric.values():
        scale = plots.colour_scale(hm.values for hm in hms)
        for hm in hms:
            hm.scale = scale
    return maps


def scale_note(metric: str, scale: tuple[float, float]) -> str:
    """The colour scale, as the heatmap's title and reading state it."""
    return f"one colour scale for every pair's {metric} heatmap: {scale[0]:.2f} to {scale[1]:.2f}"


def layerwise_section(data: ReportData, out: Path) -> Section:
    if not data.has("layerwise"):
        return _not_run("layerwise")
    section = Section("layerwise", True)
    heatmaps = layerwise_heatmaps(data)
    peaks = {
        tuple(r[k] for k in ("dataset", "vision_model", "language_model", "metric")): r
        for r in data["peaks"]
    }
    depth = {
        tuple(r[k] for k in ("dataset", "vision_model", "language_model", "metric")): r
        for r in data["depth"]
    }
    groups = _groups(data["grid"], "dataset", "vision_model", "language_model", "metric")
    summary = Table(
        [
            "dataset",
            "model pair",
            "metric",
            "peak",
            "CI",
            "null mean",
            "p",
            "at vision layer",
            "x language layer",
            "deepest third",
            "shallowest third",
        ],
        [],
        "Peak of every layer x layer grid (sql/layerwise_peaks.sql) and the mean over the "
        "deepest and shallowest thirds of the vision layers (sql/report_depth_profile.sql).",
    )
    for key in _ordered(data, groups):
        dataset, vision, language, metric = key
        rows = groups[key]
        peak, prof = peaks.get(key), depth.get(key, {})
        if peak is None:  # every score NaN: nothing to draw
            summary.rows.append(
                [dataset, pair_label(data, vision, language), metric, "no finite score"]
                + ["-"] * (len(summary.headers) - 4)
            )
            continue
        hm = heatmaps[key]
        dv = data.depth("vision", vision, peak["vision_layer"])
        dl = data.depth("language", language, peak["language_layer"])
        reading = (
            f"{metric} peaks at {fmt(peak['value'])} {fmt_ci(peak['ci_low'], peak['ci_high'])} "
            f"at vision layer {peak['vision_layer']} (relative depth {dv:.2f}) x language layer "
            f"{peak['language_layer']} (relative depth {dl:.2f}); null mean "
            f"{fmt(peak['null_mean'])}, p={fmt_p(peak['p_value'])}"
        )
        if prof and prof.get("vision_layers", 0) > 1:
            reading += (
                f"; deepest third of vision layers {fmt(prof['deep_mean'])} vs shallowest third "
                f"{fmt(prof['shallow_mean'])}"
            )
        summary.rows.append(
            [
                dataset,
                pair_label(data, vision, language),
                metric,
                fmt(peak["value"]),
                fmt_ci(peak["ci_low"], peak["ci_high"]),
                fmt(peak["null_mean"]),
                fmt_p(peak["p_value"]),
                f"{peak['vision_layer']} ({dv:.2f})",
                f"{peak['language_layer']} ({dl:.2f})",
                fmt(prof.get("deep_mean")),
                fmt(prof.get("shallow_mean")),
            ]
        )
        name = slug("layerwise", dataset, vision, language, metric)
        at = (
            hm.vision_layers.index(peak["vision_layer"]),
            hm.language_layers.index(peak["language_layer"]),
        )
        fig = plots.heatmap_figure(
            hm.values,
            hm.vision_labels,
            hm.language_labels,
            at,
            f"{dataset}: {short_pair(data, vision, language)}\n{metric}, peak "
            f"{fmt(peak['value'])} (red box) at vision {hm.vision_labels[at[0]]} x language "
            f"{hm.language_labels[at[1]]}\n{scale_note(metric, hm.scale)}",
            metric,
            scale=hm.scale,
        )
        plots.save(fig, out / f"{name}.png")
        write_csv(out / f"{name}.csv", rows)
        section.figures.append(
            Figure(
                f"{dataset}: {pair_label(data, vision, language)}, {metric}",
                f"{name}.png",
                f"{reading} ({scale_note(metric, hm.scale)})",
                f"{name}.csv",
            )
        )
    section.tables.append(summary)
    return section


def _val(x) -> float:
    return float("nan") if x is None else float(x)


# --- perturbation -------------------------------------------------------------------------


def perturbation_section(data: ReportData, out: Path) -> Section:
    if not data.has("perturbation"):
        return _not_run("perturbation")
    section = Section(
        "perturbation",
        True,
        "Drop = unperturbed minus perturbed score (positive: alignment lost), at the layer pair "
        "where the unperturbed score peaks; error bars are paired-bootstrap CIs. A text "
        "perturbation that only some captions have (role_swap: captions that state a relation) "
        "is compared with the same captions unperturbed, so its drop is not the difference of "
        "the table's two columns, which average every caption.",
    )
    groups = _groups(data["drops"], "dataset", "vision_model", "language_model", "metric")
    if not groups:
        section.intro += " The study wrote no `M_drop` rows, so there is nothing to plot."
    for key in _ordered(data, groups):
        dataset, vision, language, metric = key
        rows = groups[key]
        singles = [r for r in rows if r["perturbation"] is not None]
        pooled = [r for r in rows if r["perturbation"] is None]
        at = sorted({(r["vision_layer"], r["language_layer"]) for r in rows})
        where = " / ".join(f"vision layer {a} x language layer {b}" for a, b in at)
        unperturbed = next((r["unperturbed"] for r in rows if r["unperturbed"] is not None), None)
        parts = [f"{metric} at {where}, unperturbed {fmt(unperturbed)}"]
        if singles:
            big = max(singles, key=lambda r: r["drop"])
            small = min(singles, key=lambda r: r["drop"])
            parts.append(
                f"largest drop {big['condition']} {fmt(big['drop'])} "
                f"{fmt_ci(big['ci_low'], big['ci_high'])}, smallest {small['condition']} "
                f"{fmt(small['drop'])}"
            )
        if pooled:
            parts.append(
                "family drops "
                + ", ".join(
                    f"{r['family']} {fmt(r['drop'])}"
                    for r in sorted(pooled, key=lambda r: r["family"])
                )
            )
        name = slug("perturbation", dataset, vision, language, metric)
        plots.drop_bars(
            out / f"{name}.png",
            [
                (r["perturbation"], r["family"], r["drop"], r["ci_low"], r["ci_high"])
                for r in sorted(singles, key=lambda r: (r["family"], r["perturbation"]))
            ],
            [
                (r["family"], r["drop"], r["ci_low"], r["ci_high"])
                for r in sorted(pooled, key=lambda r: r["family"])
            ],
            f"{dataset}: {short_pair(data, vision, language)}\n{metric} drop at {where}",
            f"{metric} drop (unperturbed - perturbed)",
        )
        _add_figure(
            section,
            out,
            name,
            f"{dataset}: {pair_label(data, vision, language)}, {metric}",
            "; ".join(parts),
            rows,
            ["condition", "family", "unperturbed", "perturbed", "drop", "CI", "p", "n"],
            [
                [
                    r["condition"],
                    r["family"],
                    fmt(r["unperturbed"]),
                    fmt(r["perturbed"]),
                    fmt(r["drop"]),
                    fmt_ci(r["ci_low"], r["ci_high"]),
                    fmt_p(r["p_value"]),
                    str(r["n"] if r["n"] is not None else "-"),
                ]
                for r in rows
            ],
        )
    return section


# --- forced choice ------------------------------------------------------------------------


def forced_choice_section(data: ReportData, out: Path) -> Section:
    from vlray.report.findings import _above_chance, _direction_order, _p_value

    if not data.has("forced_choice"):
        return _not_run("forced_choice")
    section = Section(
        "forced_choice",
        True,
        "Accuracy per trial kind and direction at the deepest layer pair of each model pair "
        "(last vision layer x last language layer), with Wilson CIs; the dashed line is chance. "
        "Lexical foils differ from the truth in one word; binding and relation foils use the "
        "same words with another meaning, so a bag of words passes only the lexical ones. The "
        "table adds each pair's best layer pair per kind and direction (chosen on the same "
        "trials, so optimistic).",
    )
    groups = _groups(data["forced_choice"], "dataset", "vision_model", "language_model")
    for key in _ordered(data, groups):
        dataset, vision, language = key

        def order(r: dict) -> tuple:
            return (trial_kind_order(r["trial_kind"]), _direction_order(r))

        rows = sorted((r for r in groups[key] if r["selection"] == "deepest"), key=order)
        best = {
            (r["trial_kind"], r["direction"]): r for r in groups[key] if r["selection"] == "best"
        }
        first = rows[0]
        where = f"vision layer {first['vision_layer']} x language layer {first['language_layer']}"

        def label(r: dict) -> str:
            return f"{r['trial_kind']} {r['direction']}" if r["trial_kind"] else r["direction"]

        above = [_above_chance(r) for r in rows]
        verdict = (
            "above chance (CI low > chance, p < 0.01) in every kind and direction"
            if all(above)
            else "not above chance in: "
            + ", ".join(label(r) for r, a in zip(rows, above, strict=True) if not a)
        )
        reading = (
            f"at the deepest layer pair ({where}): "
            + ", ".join(
                f"{label(r)} {fmt(r['accuracy'])} {fmt_ci(r['ci_low'], r['ci_high'])}" for r in rows
            )
            + f"; chance {fmt(first['chance'])}; {verdict}"
        )
        name = slug("forced_choice", dataset, vision, language)
        plots.accuracy_bars(
            out / f"{name}.png",
            [
                (r["trial_kind"] or "", r["direction"], r["accuracy"], r["ci_low"], r["ci_high"])
                for r in rows
            ],
            first["chance"],
            f"{dataset}: {short_pair(data, vision, language)}\nat the deepest layer pair: {where}",
        )

        def best_cell(r: dict, best: dict = best) -> str:
            b = best.get((r["trial_kind"], r["direction"]))
            if b is None:
                return "-"
            return f"{fmt(b['accuracy'])} at ({b['vision_layer']}, {b['language_layer']})"

        _add_figure(
            section,
            out,
            name,
            f"{dataset}: {pair_label(data, vision, language)}",
            reading,
            rows + list(best.values()),
            [
                "kind",
                "direction",
                "accuracy",
                "CI",
                "chance",
                "calibrated",
                "z",
                "p",
                "trials",
                "best layer pair",
            ],
            [
                [
                    r["trial_kind"] or "-",
                    r["direction"],
                    fmt(r["accuracy"]),
                    fmt_ci(r["ci_low"], r["ci_high"]),
                    fmt(r["chance"]),
                    fmt(r["calibrated"]),
                    fmt(r["z_score"]),
                    fmt_p(_p_value(r)),
                    str(r["n"]),
                    best_cell(r),
                ]
                for r in rows
            ],
        )
    return section


# --- across models: calibrated scores and the size series -----------------------------------


def calibrated_section(data: ReportData, out: Path) -> Section:
    from vlray.report.findings import SELECTIONS, score_ci, score_of, size_series

    if not data["selected"]:
        return _not_run("layerwise")
    section = Section(
        "layerwise",
        True,
        "Raw CKA, mutual kNN and the others rise with width, depth and sample size even for "
        "unrelated data, so models and layers are compared on calibrated scores: the score "
        "minus the mean of its permutation null (the same layers with the pairing shuffled), "
        "with the bootstrap CI shifted by the same amount; z is that excess over the null's "
        "standard deviation. Every pair is read at the same two selections: its deepest layer "
        "pair and its best layer pair (highest calibrated score). Controls' bars are hatched.",
        heading="Calibrated scores across models",
    )
    groups = _groups(data["selected"], "dataset", "metric")
    for dataset, metric in sorted(groups):
        rows = groups[(dataset, metric)]
        by_pair = _groups(rows, "dataset", "vision_model", "language_model")
        keys = _ordered(data, by_pair)
        pairs = []
        for k in keys:
            sel = {r["selection"]: r for r in by_pair[k]}
            pairs.append(
                (
                    short_pair(data, k[1], k[2]),
                    data.is_control(k[1]) or data.is_control(k[2]),
                    {s: (score_of(r), *score_ci(r)) for s, r in sel.items()},
                )
            )
        name = slug("calibrated", dataset, metric)
        plots.calibrated_bars(
            out / f"{name}.png",
            pairs,
            f"{dataset}: {metric}, calibrated (value - null mean), at each pair's deepest and "
            "best layer pair",
            f"calibrated {metric}",
        )
        best = max((r for r in rows if r["selection"] == "best"), key=score_of, default=None)
        reading = (
            f"highest calibrated {metric}: {best['vision_model']} x {best['language_model']} "
            f"{fmt(score_of(best))} at ({best['vision_layer']}, {best['language_layer']})"
            if best
            else "no best-layer rows"
        )
        _add_figure(
            section,
            out,
            name,
            f"{dataset}: {metric}, calibrated",
            reading,
            rows,
            [
                "pair",
                "layers",
                "raw",
                "null mean",
                "null sd",
                "calibrated",
                "calibrated CI",
                "z",
                "p",
            ],
            [
                [
                    f"{r['vision_model']} x {r['language_model']}",
                    f"{r['selection']} ({r['vision_layer']}, {r['language_layer']})",
                    fmt(r["value"]),
                    fmt(r["null_mean"]),
                    fmt(r["null_sd"]),
                    fmt(r["calibrated"]),
                    fmt_ci(r["calibrated_ci_low"], r["calibrated_ci_high"]),
                    fmt(r["z_score"]),
                    fmt_p(r["p_value"]),
                ]
                for k in keys
                for r in sorted(by_pair[k], key=lambda r: r["selection"], reverse=True)
            ],
        )
        # The size series (the findings' own) of each pretrained language model, from two
        # members on: a figure shows a pair of models already.
        for (series_dataset, language), members in size_series(data, metric).items():
            if series_dataset != dataset or len(members) < 2:
                continue
            series = {}
            for selection in SELECTIONS:
                points = []
                for top1, vision in members:
                    r = next(
                        (
                            r
                            for r in by_pair[(dataset, vision, language)]
                            if r["selection"] == selection
                        ),
                        None,
                    )
                    if r is not None:
                        points.append((vision, top1, score_of(r), *score_ci(r)))
                series[selection] = points
            sname = slug("size_series", dataset, language, metric)
            plots.series_plot(
                out / f"{sname}.png",
                series,
                f"{dataset}: {metric} with {language}, calibrated, by the vision model's "
                "ImageNet accuracy",
                f"calibrated {metric}",
            )
            srows = [
                {
                    "selection": sel,
                    "vision_model": p[0],
                    "imagenet_top1": p[1],
                    "calibrated": p[2],
                    "ci_low": p[3],
                    "ci_high": p[4],
                }
                for sel, points in series.items()
                for p in points
            ]
            _add_figure(
                section,
                out,
                sname,
                f"{dataset}: size series with {language}, {metric}",
                "; ".join(
                    f"{sel}: " + " < ".join(f"{p[0]} {fmt(p[2])}" for p in points)
                    for sel, points in series.items()
                )
                + " (in ImageNet accuracy order)",
                srows,
                ["selection", "vision model", "ImageNet top-1", "calibrated", "CI"],
                [
                    [
                        r["selection"],
                        r["vision_model"],
                        f"{r['imagenet_top1']:g}",
                        fmt(r["calibrated"]),
                        fmt_ci(r["ci_low"], r["ci_high"]),
                    ]
                    for r in srows
                ],
            )
    return section


# --- exemplar -----------------------------------------------------------------------------


def exemplar_section(data: ReportData, out: Path) -> Section:
    if not data.has("exemplar"):
        return _not_run("exemplar")
    section = Section(
        "exemplar",
        True,
        "Score against the number of exemplars averaged per concept (k), at the deepest layer "
        "pair; bands are percentile intervals over repeated draws, dotted lines the "
        "permutation null.",
    )
    groups = _groups(data["exemplar"], "dataset", "vision_model", "language_model", "metric")
    for key in _ordered(data, groups):
        dataset, vision, language, metric = key
        rows = groups[key]
        first = rows[0]
        where = f"vision layer {first['vision_layer']} x language layer {first['language_layer']}"
        curves: dict[str, list] = defaultdict(list)
        for r in rows:
            curves[r["side"]].append(
                (r["k"], r["value"], r["ci_low"], r["ci_high"], r["null_mean"])
            )
        parts = []
        for side in sorted(curves):
            pts = {r["k"]: r for r in rows if r["side"] == side}
            ks = sorted(pts)
            lo_k, hi_k = pts[ks[0]], pts[ks[-1]]
            text = (
                f"{side}: k={ks[0]} {fmt(lo_k['value'])} -> k={ks[-1]} "
                f"{fmt(hi_k['value'])} ({hi_k['value'] - lo_k['value']:+.2f}"
            )
            if None not in (lo_k["ci_high"], hi_k["ci_low"], lo_k["ci_low"], hi_k["ci_high"]):
                overlap = lo_k["ci_low"] <= hi_k["ci_high"] and hi_k["ci_low"] <= lo_k["ci_high"]
                text += ", CIs overlap" if overlap else ", CIs do not overlap"
            parts.append(text + ")")
        reading = f"{metric} at {where}: " + "; ".join(parts)
        name = slug("exemplar", dataset, vision, language, metric)
        plots.exemplar_curves(
            out / f"{name}.png",
            dict(curves),
            f"{dataset}: {short_pair(data, vision, language)}\n{metric} at the deepest layer "
            f"pair: {where}",
            metric,
        )
        _add_figure(
            section,
            out,
            name,
            f"{dataset}: {pair_label(data, vision, language)}, {metric}",
            reading,
            rows,
            ["side", "k", metric, "CI", "null mean", "n"],
            [
                [
                    r["side"],
                    str(r["k"]),
                    fmt(r["value"]),
                    fmt_ci(r["ci_low"], r["ci_high"]),
                    fmt(r["null_mean"]),
                    str(r["n"]),
                ]
                for r in rows
            ],
        )
    return section


# --- concept retrieval --------------------------------------------------------------------


def _p_label(metric: str) -> str:
    return metric.upper()


def _k_order(r: dict) -> tuple:
    """P@K rows by K (the typed ``at_k``), a row without one last."""
    return (r["at_k"] is None, r["at_k"] or 0, r["metric"])


def _bin_order(b: str) -> tuple:
    return (BIN_ORDER.get(b.lower(), 99), b)


def concept_retrieval_section(data: ReportData, out: Path) -> Section:
    if not data.has("concept_retrieval"):
        return _not_run("concept_retrieval")
    section = Section(
        "concept_retrieval",
        True,
        "Precision at 1, 10 and 100 of retrieving a concept's word from its image-side "
        "embedding after Procrustes alignment, by nearest neighbour (nn) and CSLS; CIs "
        "bootstrap over concepts; chance is the black tick.",
    )
    groups = _groups(data["retrieval"], "dataset", "vision_model", "language_model")
    for key in _ordered(data, groups):
        dataset, vision, language = key
        all_rows = groups[key]
        rows = deepest_rows(all_rows)
        first = rows[0]
        where = f"vision layer {first['vision_layer']} x language layer {first['language_layer']}"
        n_pairs = len({(r["vision_layer"], r["language_layer"]) for r in all_rows})
        other = f" ({n_pairs - 1} other layer pairs in the CSV)" if n_pairs > 1 else ""
        name = slug("concept_retrieval", dataset, vision, language)
        write_csv(out / f"{name}.csv", all_rows)
        label = pair_label(data, vision, language)

        overall = [r for r in rows if r["breakdown"] == "overall"]
        metrics = list(dict.fromkeys(r["metric"] for r in sorted(rows, key=_k_order)))
        if overall:
            methods: dict[str, list] = defaultdict(list)
            for r in sorted(overall, key=_k_order):
                methods[r["method"]].append(
                    (_p_label(r["metric"]), r["value"], r["ci_low"], r["ci_high"], r["chance"])
                )
            reading = f"at {where}{other}: " + "; ".join(
                f"{m}: "
                + ", ".join(
                    f"{_p_label(r['metric'])} {fmt(r['value'])}"
                    + (
                        f" (chance {fmt(r['chance'])}, {r['value'] / r['chance']:.1f}x)"
                        if r["chance"]
                        else ""
                    )
                    for r in sorted(overall, key=_k_order)
                    if r["method"] == m
                )
                for m in sorted(methods)
            )
            plots.retrieval_bars(
                out / f"{name}.png",
                dict(methods),
                f"{dataset}: {short_pair(data, vision, language)}\nat {where}",
                labels=[_p_label(m) for m in metrics],
            )
            table = Table(
                ["method", "metric", "value", "CI", "chance", "x chance", "concepts"],
                [
                    [
                        r["method"],
                        _p_label(r["metric"]),
                        fmt(r["value"]),
                        fmt_ci(r["ci_low"], r["ci_high"]),
                        fmt(r["chance"]),
                        f"{r['value'] / r['chance']:.1f}" if r["chance"] else "-",
                        str(r["n"]),
                    ]
                    for r in sorted(overall, key=lambda r: (r["method"], *_k_order(r)))
                ],
            )
            section.figures.append(
                Figure(f"{dataset}: {label}", f"{name}.png", reading, f"{name}.csv", table)
            )

        for breakdown in sorted({r["breakdown"] for r in rows} - {"overall"}):
            brows = [r for r in rows if r["breakdown"] == breakdown]
            bins = sorted({r["bin"] for r in brows}, key=_bin_order)
            methods_b = sorted({r["method"] for r in brows})
            cell = {(r["bin"], r["method"], r["metric"]): r for r in brows}
            p10 = [r["metric"] for r in brows if r["at_k"] == RETRIEVAL.top_k]
            shown = p10[0] if p10 else metrics[0]
            table = Table(
                [breakdown]
                + [f"{m} {_p_label(k)}" for m in methods_b for k in metrics]
                + ["concepts"],
                [
                    [b]
                    + [
                        (
                            f"{fmt(c['value'])} {fmt_ci(c['ci_low'], c['ci_high'])}"
                            f" (chance {fmt(c['chance'])})"
                            if (c := cell.get((b, m, k)))
                            else "-"
                        )
                        for m in methods_b
                        for k in metrics
                    ]
                    + [str(max((r["n"] or 0) for r in brows if r["bin"] == b))]
                    for b in bins
                ],
            )
            series = {
                m: [
                    (
                        b,
                        cell[(b, m, shown)]["value"],
                        cell[(b, m, shown)]["ci_low"],
                        cell[(b, m, shown)]["ci_high"],
                        cell[(b, m, shown)]["chance"],
                    )
                    for b in bins
                    if (b, m, shown) in cell
                ]
                for m in methods_b
            }
            reading = f"{_p_label(shown)} by {breakdown} at {where}: " + "; ".join(
                f"{m} " + ", ".join(f"{b} {fmt(v)}" for b, v, *_ in series[m]) for m in methods_b
            )
            bname = slug("concept_retrieval", dataset, vision, language, breakdown)
            plots.retrieval_bars(
                out / f"{bname}.png",
                series,
                f"{dataset}: {short_pair(data, vision, language)}\n"
                f"{_p_label(shown)} by {breakdown} bin, at {where}",
                labels=bins,
                xlabel=f"{breakdown} bin",
            )
            section.figures.append(
                Figure(
                    f"{dataset}: {label}, by {breakdown}",
                    f"{bname}.png",
                    reading,
                    f"{name}.csv",
                    table,
                )
            )
    return section


SECTIONS = (
    layerwise_section,
    calibrated_section,
    perturbation_section,
    forced_choice_section,
    exemplar_section,
    concept_retrieval_section,
)


# Sections of tables only (no figure to draw), shown before the studies' sections.
NOTES = (study_log_section, quarantine_section)


def _build(job: tuple[int, ReportData, Path]) -> Section:
    index, data, out = job
    return SECTIONS[index](data, out)


def build_sections(data: ReportData, out: Path, workers: int | None = None) -> list[Section]:
    """The sections of what did not run and what was refused (NOTES), then every study's
    section, its PNG and CSV files written into ``out``.

    Drawing is CPU-bound matplotlib work, so the sections are drawn in ``workers`` processes
    (default: one per core, at most one per section); ``workers=1`` draws them in this one.
    """
    notes = [note(data) for note in NOTES]
    jobs = [(i, data, out) for i in range(len(SECTIONS))]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return notes + [_build(job) for job in jobs]
    # "spawn": a fresh interpreter per worker, safe beside the threads Ray or DuckDB started.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return notes + list(pool.map(_build, jobs))
