"""The report page: plain HTML (no JavaScript), self-contained apart from its PNG and CSV
files, which sit beside it; rendered from the jinja2 templates in ``templates/`` (the page,
its table and section macros, and its style sheet)."""

from __future__ import annotations

import datetime as _dt

from jinja2 import Environment, PackageLoader, StrictUndefined

from vlray.report.data import STUDY_TITLES, ReportData
from vlray.report.findings import Finding
from vlray.report.sections import Section, Table

# Autoescaping on for every template: names and reasons come from the user's data and lake.
_TEMPLATES = Environment(
    loader=PackageLoader("vlray.report", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def _header(data: ReportData) -> dict[str, object]:
    """The page's header: what the lake holds (key, value pairs), its models and studies."""
    overview = data["overview"]
    datasets = sorted({r["dataset"] for r in overview})
    runs = sorted({run for r in overview for run in (r["run_ids"] or "").split(", ") if run})
    created = [r[k] for r in overview for k in ("first_created_at", "last_created_at") if r[k]]
    versions = sorted(
        {v for r in overview for v in r["embeddings_versions"] or [] if v is not None}
    )
    span = f"{min(created):%Y-%m-%d %H:%M} to {max(created):%Y-%m-%d %H:%M} UTC" if created else "-"
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    models = Table(["model", "side", "layers in results", "init", "init from"], [])
    for r in data["models"]:
        info = data.info[r["model"]]
        models.rows.append(
            [
                r["model"],
                r["side"],
                str(r["layers"]),
                info.init + (" (control)" if info.control else ""),
                info.provenance,
            ]
        )
    items = [
        ("lake", data.lake),
        ("datasets", ", ".join(datasets)),
        ("run ids", ", ".join(runs)),
        (
            "embeddings versions",
            ", ".join(map(str, versions)) + " (read them with vlray sql --as-of VERSION)"
            if versions
            else "not recorded",
        ),
        ("results", f"computed {span}"),
        ("report", f"generated {now}"),
    ]
    studies = Table(
        ["study", "dataset", "model pairs", "metrics", "scores", "embeddings version", "run ids"],
        [],
    )
    for r in overview:
        studies.rows.append(
            [
                r["study"],
                r["dataset"],
                str(r["model_pairs"]),
                str(r["metrics"]),
                str(r["scores"]),
                ", ".join(str(v) for v in r["embeddings_versions"] or [] if v is not None) or "-",
                r["run_ids"] or "",
            ]
        )
    for study in STUDY_TITLES:
        if not data.has(study):
            studies.rows.append([study, "-", "-", "-", "-", "-", "not run"])
    return {"header": items, "models": models, "studies": studies}


def _findings(found: list[Finding]) -> dict[str, object]:
    """The findings table, a CSS class per row from its status ('not run' -> not-run)."""
    t = Table(
        ["finding", "dataset", "model pair", "metric", "status", "numbers", "how it is read"],
        [
            [
                f.title,
                f.dataset or "-",
                f.pair or "-",
                f.metric or "-",
                f.status,
                f.text,
                "; ".join(f.details()) or "-",
            ]
            for f in found
        ],
        "Computed by vlray.report.findings from the alignment table; 'not run' means the "
        "study (or what the finding needs from it) is not in the lake.",
    )
    return {"findings": t, "finding_classes": [f.status.replace(" ", "-") for f in found]}


def render(data: ReportData, found: list[Finding], sections: list[Section]) -> str:
    """The page, from templates/report.html (autoescaped: a model or dataset name is text)."""
    return _TEMPLATES.get_template("report.html").render(
        lake=data.lake, sections=sections, **_header(data), **_findings(found)
    )
