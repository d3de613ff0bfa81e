"""The report: headline findings and an HTML page with PNG figures from the alignment table.

- ``vlray.report.data``: the named ``sql/report_*.sql`` queries and model metadata;
- ``vlray.report.findings``: the headline findings (``findings(lake) -> list[Finding]``);
- ``vlray.report.plots``: the matplotlib figures;
- ``vlray.report.sections``: per study, the figures with their numbers and one-line readings;
- ``vlray.report.html``: the page, rendered from the jinja2 templates in ``templates/``;
- ``vlray.report.build``: ``write_report(lake, out)``, what ``vlray report`` runs.
"""

from vlray.report.build import write_report
from vlray.report.data import ReportData, ReportError, load
from vlray.report.findings import FINDINGS, Finding, findings

__all__ = ["FINDINGS", "Finding", "ReportData", "ReportError", "findings", "load", "write_report"]
