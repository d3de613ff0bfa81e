"""The report page: plain HTML (no JavaScript), self-contained apart from its PNG and CSV
files, which sit beside it."""

from __future__ import annotations

import datetime as _dt
from html import escape

from vlray.report.data import STUDY_TITLES, ReportData
from vlray.report.findings import Finding
from vlray.report.sections import Section, Table

STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 1.5em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1em; margin-bottom: 0.2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
caption { caption-side: bottom; font-size: 0.85em; color: #555; text-align: left; }
.holds { background: #d9f2d9; } .does-not-hold { background: #f8d7d7; }
.not-run { background: #eee; color: #666; } .not-significant { background: #fff3cd; }
.status-failed { background: #f8d7d7; } .status-skipped { background: #eee; }
.status-small-n { background: #fff3cd; }
pre.sql { background: #f6f6f6; padding: 0.3em 0.6em; font-size: 0.85em; overflow-x: auto; }
.notrun { color: #666; font-style: italic; }
.figure { margin: 1.2em 0; }
.row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.row img { max-width: 100%; border: 1px solid #ddd; }
.reading { margin: 0.2em 0; } .files { font-size: 0.8em; color: #555; }
dl.header dt { float: left; clear: left; width: 8em; font-weight: bold; }
dl.header dd { margin-left: 8.5em; }
"""


def _table(t: Table, classes: list[str] | None = None) -> str:
    classes = classes or t.classes
    head = "".join(f"<th>{escape(h)}</th>" for h in t.headers)
    body = []
    for i, row in enumerate(t.rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>")
    caption = f"<caption>{escape(t.caption)}</caption>" if t.caption else ""
    code = f'<pre class="sql"><code>{escape(t.code)}</code></pre>' if t.code else ""
    return (
        f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        + code
    )


def _header(data: ReportData) -> str:
    overview = data["overview"]
    datasets = sorted({r["dataset"] for r in overview})
    runs = sorted({run for r in overview for run in (r["run_ids"] or "").split(", ") if run})
    created = [r[k] for r in overview for k in ("first_created_at", "last_created_at") if r[k]]
    versions = sorted(
        {v for r in overview for v in r["embeddings_versions"] or [] if v is not None}
    )
    span = f"{min(created):%Y-%m-%d %H:%M} to {max(created):%Y-%m-%d %H:%M} UTC" if created else "-"
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    models = Table(["model", "side", "layers in results", "init", "catalog"], [])
    for r in data["models"]:
        info = data.info[r["model"]]
        models.rows.append(
            [
                r["model"],
                r["side"],
                str(r["layers"]),
                info.init + (" (control)" if info.control else ""),
                "yes" if info.in_catalog else "not in catalog: taken as pretrained",
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
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
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
    return (
        f'<dl class="header">{dl}</dl>\n<h3>Models</h3>{_table(models)}'
        f"\n<h3>Studies</h3>{_table(studies)}"
    )


def _findings(found: list[Finding]) -> str:
    t = Table(
        ["finding", "dataset", "model pair", "metric", "status", "numbers"],
        [
            [f.title, f.dataset or "-", f.pair or "-", f.metric or "-", f.status, f.text]
            for f in found
        ],
        "Computed by vlray.report.findings from the alignment table; 'not run' means the "
        "study (or what the finding needs from it) is not in the lake.",
    )
    classes = [f.status.replace(" ", "-") for f in found]
    return _table(t, classes)


def _section(s: Section) -> str:
    parts = [
        f'<h2 id="{escape(s.study)}">{escape(s.title)} <small>({escape(s.study)})</small></h2>'
    ]
    if not s.ran:
        parts.append(f'<p class="notrun">{escape(s.intro)}</p>')
        return "\n".join(parts)
    if s.intro:
        parts.append(f"<p>{escape(s.intro)}</p>")
    parts += [_table(t) for t in s.tables]
    for f in s.figures:
        table = _table(f.table) if f.table else ""
        files = f'numbers: <a href="{escape(f.csv)}">{escape(f.csv)}</a>' if f.csv else ""
        parts.append(
            f'<div class="figure"><h3>{escape(f.title)}</h3>'
            f'<p class="reading">{escape(f.reading)}</p>'
            f'<div class="row"><img src="{escape(f.png)}" alt="{escape(f.title)}">{table}</div>'
            f'<p class="files">{files}</p></div>'
        )
    return "\n".join(parts)


def render(data: ReportData, found: list[Finding], sections: list[Section]) -> str:
    nav = " | ".join(
        f'<a href="#{escape(s.study)}">{escape(s.title)}</a>' + ("" if s.ran else " (not run)")
        for s in sections
    )
    body = "\n".join(_section(s) for s in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vlray report: {escape(data.lake)}</title>
<style>{STYLE}</style></head>
<body>
<h1>vlray report</h1>
{_header(data)}
<p>{nav}</p>
<h2 id="findings">Headline findings</h2>
{_findings(found)}
{body}
</body></html>
"""
