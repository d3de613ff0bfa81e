"""What a run is asked to do: the options of extraction and of alignment, one model each.

These pydantic models are both the runtime options (``ExtractOptions`` travels to the
extraction's actors, ``AlignOptions`` to every alignment task) and the schema of the run
config's ``extract:`` and ``align:`` sections (``vlray.config``): a default or a bound is
written once, here. Unknown fields are refused, and every error names its field
(:func:`field_errors`). Importing this module loads pydantic only, so that validating a
config stays cheap.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError

from vlray.studies import STUDY_NAMES

# Bytes one alignment task may hold (a layerwise block's arrays and its resamples' Gram
# matrices); the sharded grid is cut so that every task fits.
DEFAULT_MEMORY_PER_TASK = 2 << 30

StudyName = Literal[STUDY_NAMES]  # type: ignore[valid-type]  # the registry's names


def field_errors(err: ValidationError, where: str) -> str:
    """One line per field of a pydantic error: ``WHERE: field 'a.b.0': message``."""
    return "\n".join(
        f"{where}: field '{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in err.errors()
    )


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExtractOptions(_Options):
    """How hard to push the hardware. Defaults suit a 2-core laptop and a GPU node alike."""

    batch_size: int = Field(default=32, ge=1)
    actors: int = Field(default=1, ge=1)
    # Fractional CPUs, so that read, decode and write tasks always find a slot beside the pool
    # (an actor holding every CPU starves them and the job waits forever).
    cpus_per_actor: float = Field(default=0.5, gt=0)
    decode_cpus: float = Field(default=0.5, gt=0)
    io_cpus: float = Field(default=0.25, gt=0)
    gpus_per_actor: float | None = Field(default=None, ge=0)  # None: 1 with GPUs, else 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    torch_threads: int | None = Field(default=None, ge=1)  # None: every core of the node, on CPU
    # Where JPEGs are decoded: "device" = nvJPEG on the actor's GPU (CPU tasks only check
    # headers), "cpu" = Pillow in CPU tasks; auto = device when the actor has a GPU.
    decode: Literal["auto", "cpu", "device"] = "auto"
    # Batches one actor works on at once: on a GPU, one computes while another is staged or
    # turned into Arrow. None: with a GPU 3 for images and 2 for texts, 1 without.
    concurrent_batches: int | None = Field(default=None, ge=1)
    # Texts per length bucket inside a batch (less padding). None: 256 without a GPU; with one,
    # up to 4,096, cut where padding is least, about one bucket per `bucket_tokens` tokens.
    bucket_rows: int | None = Field(default=None, ge=1)
    # None: 32,768 with a GPU (one full forward pass), off without.
    bucket_tokens: int | None = Field(default=None, ge=1)
    # Texts per actor call (tokenised in tasks of the same size). None: batch_size without a
    # GPU, at least 4,096 with one: a text is tiny, and a large batch sorts into fuller buckets.
    text_batch_size: int | None = Field(default=None, ge=1)
    # Items per write task (one Parquet file per layer each): small enough that the last write
    # finishes soon after the model, large enough for files of a few MB.
    items_per_write: int = Field(default=1024, ge=1)
    # With device decoding, the share of JPEGs that the CPU tasks decode all the same (spread
    # evenly through each batch), which takes that load off the GPU.
    cpu_decode_share: float = Field(default=0.0, ge=0, le=1)
    # A local folder where each actor appends one JSON line per batch (start, end, rows):
    # the extraction benchmark's steady-state clock. None: no trace.
    trace_dir: str | None = None
    # Models that embed only the unperturbed items (perturbation ``none``): a model series
    # that every study but the perturbation study can use, without paying for the perturbed
    # copies (the perturbation study then scores only the other side's perturbations).
    unperturbed_only: tuple[str, ...] = ()


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


class AlignOptions(_Options):
    """Options of one alignment job: shared scoring settings, studies to run, resources."""

    metrics: tuple[str, ...] = Field(
        default=("mutual_knn", "cka", "unbiased_cka", "rsa"), min_length=1
    )
    # metric -> kwargs, e.g. {"mutual_knn": {"k": 10}}
    metric_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    bootstrap: int = Field(default=100, ge=0)
    permutations: int = Field(default=100, ge=0)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    seed: int = 0
    captions: Literal["mean", "first"] = "mean"  # an image's text side: mean of its captions
    image_roles: tuple[str, ...] = ("scene", "exemplar")
    studies: tuple[StudyName, ...] = Field(default=STUDY_NAMES, min_length=1)
    # model -> the only studies its pairs run (of ``studies``): a model series that needs one
    # study need not pay for all five. A model not named runs every study.
    model_studies: dict[str, tuple[StudyName, ...]] = Field(default_factory=dict)
    perturbation: PerturbationOptions = Field(default_factory=PerturbationOptions)
    forced_choice: ForcedChoiceOptions = Field(default_factory=ForcedChoiceOptions)
    exemplar: ExemplarOptions = Field(default_factory=ExemplarOptions)
    concept_retrieval: ConceptRetrievalOptions = Field(default_factory=ConceptRetrievalOptions)
    cpus_per_task: float = Field(default=1.0, gt=0)
    gpus_per_task: float | None = Field(default=None, ge=0)  # None: a quarter GPU with GPUs
    # The layerwise grid runs as many Ray tasks (blocks of layers x shards of resamples and
    # permutations), each within this many bytes ("2GiB", "512MB" in a config); False: the
    # whole grid in one task.
    shard: bool = True
    memory_per_task: ByteSize = Field(default=ByteSize(DEFAULT_MEMORY_PER_TASK), gt=0)

    def metric_kw(self, metric: str) -> dict:
        return dict(self.metric_kwargs.get(metric, {}))

    def scoring(self, study: str) -> dict:
        """What a study's scores depend on (for the results' inputs hash)."""
        shared = self.model_dump(
            include={
                "metrics",
                "metric_kwargs",
                "bootstrap",
                "permutations",
                "confidence",
                "seed",
                "captions",
                "image_roles",
            }
        )
        own = getattr(self, study, None)
        return {**shared, study: own.model_dump() if isinstance(own, BaseModel) else None}
