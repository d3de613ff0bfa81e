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

A study reads what it needs through :class:`vlray.studies.inputs.StudyInputs` (one dataset, one
vision and one language model), returns rows of the ``alignment`` results table
(``vlray.results``), and raises ``StudySkipped`` when the dataset lacks its inputs (no trials,
no perturbations, too few concepts).

Adding a study is one module here and one entry in ``STUDIES`` (plus, if it takes options, its
options model in ``vlray.options``). ``STUDIES`` is the only list of study names: the config's
``align.studies``, the report's sections and the results' ``study`` column all read it. The
modules are imported on first use, so that validating a config does not load numpy, torch or
Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .inputs import SmallN, StudyInputs


@dataclass(frozen=True)
class Study:
    """One study: its name (its module's, and the ``study`` column's value) and its title."""

    name: str
    title: str  # the report's heading

    @property
    def module(self) -> ModuleType:
        return import_module(f"{__name__}.{self.name}")

    def run(self, inputs: StudyInputs, run_id: str) -> list[dict]:
        """The study's rows of the ``alignment`` table for one dataset and model pair."""
        return self.module.run(inputs, run_id)

    @property
    def small_n(self) -> SmallN:
        """Below this size the study's scores are written with a warning (``SMALL_N``)."""
        return self.module.SMALL_N

    @property
    def submits_tasks(self) -> bool:
        """Whether the study fans out its own Ray tasks (module flag ``SUBMITS_TASKS``) when
        sharding is on: it then runs from the driver, the others inside one task per pair."""
        return bool(getattr(self.module, "SUBMITS_TASKS", False))


STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        Study("layerwise", "Layerwise alignment"),
        Study("perturbation", "Perturbations"),
        Study("forced_choice", "Forced choice"),
        Study("exemplar", "Exemplar averaging"),
        Study("concept_retrieval", "Concept retrieval"),
    )
}
STUDY_NAMES: tuple[str, ...] = tuple(STUDIES)

__all__ = ["STUDIES", "STUDY_NAMES", "Study"]
