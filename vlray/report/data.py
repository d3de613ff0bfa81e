"""What the report reads: the named ``sql/report_*.sql`` queries over the lake's ``alignment``
view (and its ``study_log``, ``quarantine`` and ``manifest`` views), each model's init
(pretrained, or a random-init control) among them, as the lake recorded it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from vlray.errors import VlrayError
from vlray.lake import Lake
from vlray.studies import STUDIES

STUDY_TITLES = {name: study.title for name, study in STUDIES.items()}  # the registry's

# The named queries the report runs (sql/NAME.sql), by the name they are kept under here.
QUERIES = {
    "overview": "report_overview",
    "models": "report_models",
    "peaks": "layerwise_peaks",
    "selected": "report_layerwise_selected",
    "grid": "report_layerwise_grid",
    "depth": "report_depth_profile",
    "drops": "report_perturbation_drops",
    "forced_choice": "report_forced_choice",
    "exemplar": "report_exemplar_curves",
    "retrieval": "report_concept_retrieval",
    "study_log": "report_study_log",
    "study_log_counts": "report_study_log_counts",
    "quarantine": "report_quarantine",
    "layer_names": "report_layer_names",
    "init": "report_model_init",
}


class ReportError(VlrayError, ValueError):
    """The lake cannot be reported on (no lake, no results); the message names the lake."""


class NoResultsError(ReportError):
    """The lake exists but its alignment table is empty."""


@dataclass(frozen=True)
class ModelInfo:
    """How a model's weights were initialised, and where the report learned it."""

    name: str
    init: str  # pretrained | random ("pretrained, random": one name recorded both ways)
    # "lake": the manifest's record, made when the model was embedded; "catalog": no record,
    # the catalog of today; "none": neither knows the model, taken as pretrained.
    source: str

    @property
    def control(self) -> bool:
        return self.init == "random"

    @property
    def provenance(self) -> str:
        """Where ``init`` comes from, for the report's table of models."""
        return {
            "lake": "recorded in the lake when embedded",
            "catalog": "not recorded in the lake: the current catalog's",
            "none": "not recorded, not in the catalog: taken as pretrained",
        }[self.source]


def model_info(name: str, recorded: str | None = None) -> ModelInfo:
    """A model's init as the lake recorded it (``recorded``, the manifest's ``init``), so that
    a lake's report does not change with catalog.yaml. Only a model without a record (results
    written without extracting, a 0.1 lake whose spec had changed before its upgrade) falls
    back to the catalog, and a name it does not know either is taken as pretrained."""
    if recorded is not None:
        return ModelInfo(name, recorded, "lake")
    from vlray.catalog import CatalogError, get_spec

    try:
        spec = get_spec(name)
    except CatalogError:
        return ModelInfo(name, "pretrained", "none")
    return ModelInfo(name, spec.init, "catalog")


@dataclass
class ReportData:
    """The rows of every report query, as lists of dicts."""

    lake: str
    rows: dict[str, list[dict]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> list[dict]:
        return self.rows.get(name, [])

    @cached_property
    def studies(self) -> set[str]:
        return {r["study"] for r in self["overview"]}

    def has(self, study: str) -> bool:
        return study in self.studies

    @cached_property
    def layers(self) -> dict[tuple[str, str], int]:
        """(side, model) -> number of distinct layers in the results."""
        return {(r["side"], r["model"]): int(r["layers"]) for r in self["models"]}

    def depth(self, side: str, model: str, layer: int) -> float:
        """Relative depth i / (L - 1) of a layer, L the model's distinct layers (0 if L = 1)."""
        n = self.layers.get((side, model), 1)
        return layer / (n - 1) if n > 1 else 0.0

    @cached_property
    def layer_names(self) -> dict[tuple[str, str], list[str]]:
        """(dataset, model) -> its layer names from the manifest (index = ``layer``); a model
        with no manifest record (a lake of results only) is not in it."""
        names: dict[tuple[str, str], list[str]] = {}
        for r in self["layer_names"]:
            names.setdefault((r["dataset"], r["model"]), []).append(r["layer_name"])
        return names

    def layer_label(self, dataset: str, side: str, model: str, layer: int) -> str:
        """A layer for an axis: its manifest name and relative depth i / (L - 1), L the
        model's tapped layers, as "blocks.3 (0.50)"; "layer 3 (0.75)" when the manifest has
        no name for it (depth then over the layers in the results)."""
        names = self.layer_names.get((dataset, model), [])
        if 0 <= layer < len(names):
            depth = layer / (len(names) - 1) if len(names) > 1 else 0.0
            return f"{names[layer]} ({depth:.2f})"
        return f"layer {layer} ({self.depth(side, model, layer):.2f})"

    @cached_property
    def recorded_init(self) -> dict[str, str]:
        """model -> its init as the manifest recorded it (models without a record left out)."""
        return {r["model"]: r["init"] for r in self["init"]}

    @cached_property
    def info(self) -> dict[str, ModelInfo]:
        return {
            r["model"]: model_info(r["model"], self.recorded_init.get(r["model"]))
            for r in self["models"]
        }

    def model(self, name: str) -> ModelInfo:
        return self.info.get(name) or model_info(name, self.recorded_init.get(name))

    def is_control(self, model: str) -> bool:
        return self.model(model).control

    def pairs(self) -> list[tuple[str, str, str]]:
        """Every (dataset, vision model, language model) with results in any study."""
        keys = set()
        for name in ("grid", "drops", "forced_choice", "exemplar", "retrieval"):
            keys |= {(r["dataset"], r["vision_model"], r["language_model"]) for r in self[name]}
        return sorted(keys)

    def pretrained_pairs(self) -> list[tuple[str, str, str]]:
        return [p for p in self.pairs() if not self.is_control(p[1]) and not self.is_control(p[2])]


def load(lake: Lake | str) -> ReportData:
    """Run the report's named queries over a lake; raises ReportError naming the lake when
    it has no lake or no alignment results."""
    from vlray.sql import QueryError, connect, named_query, run_query

    uri = lake.uri if isinstance(lake, Lake) else str(lake)
    try:
        con = connect(lake)
    except QueryError as err:
        raise ReportError(f"cannot report on lake {uri}: {err}") from None
    data = ReportData(uri)
    try:
        for key, name in QUERIES.items():
            data.rows[key] = run_query(con, named_query(name)).to_pylist()
    except QueryError as err:
        raise ReportError(f"cannot read the alignment results of lake {uri}: {err}") from None
    finally:
        con.close()
    if not data["overview"]:
        raise NoResultsError(
            f"lake {uri} has no alignment results (LAKE/results/alignment is empty): "
            "run `vlray align` first"
        )
    return data


def deepest_rows(rows: list[dict]) -> list[dict]:
    """The rows at the deepest layer pair (flagged by the query; else the last pair by layer)."""
    flagged = [r for r in rows if r.get("deepest")]
    if flagged or not rows:
        return flagged
    last = max((r["vision_layer"], r["language_layer"]) for r in rows)
    return [r for r in rows if (r["vision_layer"], r["language_layer"]) == last]


def fmt(x: float | None, digits: int = 2) -> str:
    """A score for reading: 2 decimals (3 below 0.1 in magnitude); '-' when missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    x = float(x)
    if x != 0 and abs(x) < 0.1:
        digits += 1
    return f"{x:.{digits}f}"


def fmt_p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def fmt_ci(lo: float | None, hi: float | None) -> str:
    if lo is None and hi is None:
        return "no CI"
    return f"[{fmt(lo)}, {fmt(hi)}]"
