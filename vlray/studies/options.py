"""What the studies are asked to compute: shared scoring options and each study's own.

``AlignOptions`` travels to every Ray task; the per-study option models are also the schema of
the config's ``align.<study>`` sections (validated on load, unknown fields refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vlray.shards import DEFAULT_MEMORY_PER_TASK

STUDY_NAMES = ("layerwise", "perturbation", "forced_choice", "exemplar", "concept_retrieval")


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PerturbationOptions(_Options):
    """Perturbed against unperturbed alignment on the same items (He, Trott & Khosla 2025)."""

    metrics: list[str] | None = None  # default: align.metrics
    bootstrap: int | None = Field(default=None, ge=0)  # for the drops; default align.bootstrap


class ForcedChoiceOptions(_Options):
    """A linear map fitted on training pairs, then two-alternative (or n-way) choices."""

    map: Literal["ridge", "procrustes"] = "ridge"
    folds: int = Field(default=5, ge=2)  # trials are cross-fitted: every trial is held out once
    layers: Literal["all", "last"] = "all"


class ExemplarOptions(_Options):
    """Concept-level alignment with k exemplars averaged per concept."""

    metrics: list[str] | None = None  # default: align.metrics
    # A concept's text exemplars: captions of its images, or sentences using its word.
    text: Literal["caption", "context"] = "caption"
    draws: int = Field(default=20, ge=1)  # random draws of the k exemplars per point
    permutations: int | None = Field(default=None, ge=0)  # default: align.permutations
    max_k: int | None = Field(default=None, ge=1)  # default: as many as every concept has


class ConceptRetrievalOptions(_Options):
    """Procrustes concept retrieval (Li et al., TACL 2024)."""

    layers: Literal["last", "all"] = "last"
    k: list[int] = Field(default_factory=lambda: [1, 10, 100], min_length=1)
    folds: int = Field(default=5, ge=2)
    csls_k: int = Field(default=10, ge=1)
    permutations: int = Field(default=100, ge=0)  # concept pairing shuffled, for p-values


@dataclass(frozen=True)
class AlignOptions:
    """Options of one alignment job: shared scoring settings, studies to run, resources."""

    metrics: tuple[str, ...] = ("mutual_knn", "cka", "unbiased_cka", "rsa")
    metric_kwargs: dict | None = None  # metric -> kwargs, e.g. {"mutual_knn": {"k": 10}}
    bootstrap: int = 100
    permutations: int = 100
    confidence: float = 0.95
    seed: int = 0
    captions: str = "mean"  # an image's text side: the mean of its captions, or the first
    image_roles: tuple[str, ...] = ("scene", "exemplar")
    studies: tuple[str, ...] = STUDY_NAMES
    perturbation: PerturbationOptions = field(default_factory=PerturbationOptions)
    forced_choice: ForcedChoiceOptions = field(default_factory=ForcedChoiceOptions)
    exemplar: ExemplarOptions = field(default_factory=ExemplarOptions)
    concept_retrieval: ConceptRetrievalOptions = field(default_factory=ConceptRetrievalOptions)
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None  # None: a quarter GPU when the cluster has GPUs
    # The layerwise grid runs as many Ray tasks (blocks of layers x shards of resamples and
    # permutations), each within this many bytes; False: the whole grid in one task.
    shard: bool = True
    memory_per_task: int = DEFAULT_MEMORY_PER_TASK

    def __post_init__(self) -> None:
        unknown = [s for s in self.studies if s not in STUDY_NAMES]
        if unknown:
            raise ValueError(f"unknown study '{unknown[0]}'; known: {', '.join(STUDY_NAMES)}")

    def metric_kw(self, metric: str) -> dict:
        return dict((self.metric_kwargs or {}).get(metric, {}))

    def scoring(self, study: str) -> dict:
        """What a study's scores depend on (for the results' inputs hash)."""
        shared = {
            k: getattr(self, k)
            for k in (
                "metrics",
                "metric_kwargs",
                "bootstrap",
                "permutations",
                "confidence",
                "seed",
                "captions",
                "image_roles",
            )
        }
        own = getattr(self, study, None)
        return {**shared, study: own.model_dump() if isinstance(own, BaseModel) else None}
