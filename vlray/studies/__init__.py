"""The five studies (README: "The five studies"), one module each: ``run(inputs, run_id)``.

==================  =========================================================================
study               question (paper)
==================  =========================================================================
layerwise           how aligned is every (vision layer, language layer) pair? (He+ 2025)
perturbation        does alignment survive appearance changes, fall under semantic ones?
forced_choice       does a map between the spaces pick the preferred image / caption?
exemplar            does averaging k exemplars per concept raise concept-level alignment?
concept_retrieval   can a Procrustes map retrieve a concept's word from its images? (Li+ 2024)
==================  =========================================================================

A study reads what it needs through :class:`StudyInputs` (one dataset, one vision and one
language model), returns rows of the ``alignment`` results table (``vlray.results``), and
raises :class:`StudySkipped` when the dataset lacks its inputs (no trials, no perturbations,
too few concepts). Adding a study is one module and one entry in ``_MODULES``.
"""

from __future__ import annotations

from collections.abc import Callable

from . import concept_retrieval, exemplar, forced_choice, layerwise, perturbation
from .inputs import SmallN, StudyInputs, StudySkipped
from .options import STUDY_NAMES, AlignOptions

_MODULES = {
    "layerwise": layerwise,
    "perturbation": perturbation,
    "forced_choice": forced_choice,
    "exemplar": exemplar,
    "concept_retrieval": concept_retrieval,
}
STUDIES: dict[str, Callable[[StudyInputs, str], list[dict]]] = {
    name: module.run for name, module in _MODULES.items()
}
# Below these sizes a study's scores are written with a warning (module attribute ``SMALL_N``).
SMALL_N: dict[str, SmallN] = {name: module.SMALL_N for name, module in _MODULES.items()}
# Studies that fan out their own Ray tasks (module flag ``SUBMITS_TASKS``) when sharding is on:
# they run from the driver, the others inside one task per model pair.
SUBMITS_TASKS = frozenset(n for n, m in _MODULES.items() if getattr(m, "SUBMITS_TASKS", False))

__all__ = [
    "SMALL_N",
    "STUDIES",
    "STUDY_NAMES",
    "SUBMITS_TASKS",
    "AlignOptions",
    "SmallN",
    "StudyInputs",
    "StudySkipped",
]
