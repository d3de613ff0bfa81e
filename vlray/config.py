"""Run configs (YAML), validated on load: a bad field fails before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError

from vlray.catalog import CatalogError, ModelSpec, load_catalog
from vlray.extract import ExtractOptions
from vlray.sources import check_params
from vlray.studies.options import (
    DEFAULT_MEMORY_PER_TASK,
    STUDY_NAMES,
    AlignOptions,
    ConceptRetrievalOptions,
    ExemplarOptions,
    ForcedChoiceOptions,
    PerturbationOptions,
)

StudyName = Literal["layerwise", "perturbation", "forced_choice", "exemplar", "concept_retrieval"]


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the field."""


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str
    params: dict[str, Any] = Field(default_factory=dict)


class ExtractConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=32, ge=1)
    actors: int = Field(default=1, ge=1)
    cpus_per_actor: float = Field(default=0.5, gt=0)
    decode_cpus: float = Field(default=0.5, gt=0)
    io_cpus: float = Field(default=0.25, gt=0)
    gpus_per_actor: float | None = Field(default=None, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    torch_threads: int | None = Field(default=None, ge=1)
    decode: Literal["auto", "cpu", "device"] = "auto"
    concurrent_batches: int | None = Field(default=None, ge=1)
    bucket_rows: int | None = Field(default=None, ge=1)
    bucket_tokens: int | None = Field(default=None, ge=1)
    text_batch_size: int | None = Field(default=None, ge=1)
    items_per_write: int = Field(default=1024, ge=1)
    cpu_decode_share: float = Field(default=0.0, ge=0, le=1)

    def options(self) -> ExtractOptions:
        return ExtractOptions(**self.model_dump())


class AlignConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metrics: list[str] = Field(
        default_factory=lambda: ["mutual_knn", "cka", "unbiased_cka", "rsa"], min_length=1
    )
    metric_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    bootstrap: int = Field(default=100, ge=0)
    permutations: int = Field(default=100, ge=0)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    seed: int = 0
    captions: Literal["mean", "first"] = "mean"
    image_roles: list[str] = Field(default_factory=lambda: ["scene", "exemplar"])
    studies: list[StudyName] = Field(default_factory=lambda: list(STUDY_NAMES), min_length=1)
    perturbation: PerturbationOptions = Field(default_factory=PerturbationOptions)
    forced_choice: ForcedChoiceOptions = Field(default_factory=ForcedChoiceOptions)
    exemplar: ExemplarOptions = Field(default_factory=ExemplarOptions)
    concept_retrieval: ConceptRetrievalOptions = Field(default_factory=ConceptRetrievalOptions)
    cpus_per_task: float = Field(default=1.0, gt=0)
    gpus_per_task: float | None = Field(default=None, ge=0)
    shard: bool = True
    memory_per_task: ByteSize = Field(default=DEFAULT_MEMORY_PER_TASK, gt=0)  # "2GiB", "512MB"

    def options(self) -> AlignOptions:
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        for name in ("metrics", "image_roles", "studies"):
            fields[name] = tuple(fields[name])
        fields["memory_per_task"] = int(fields["memory_per_task"])
        return AlignOptions(**fields)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[DatasetConfig] = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    catalog: list[str] = Field(default_factory=list)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    lake: str | None = None

    def specs(self) -> list[ModelSpec]:
        catalog = load_catalog(*self.catalog)
        return [catalog[name] for name in self.models]


def _field_errors(err: ValidationError, where: str) -> str:
    return "\n".join(
        f"{where}: field '{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in err.errors()
    )


def validate_config(raw: dict, where: str) -> RunConfig:
    """Check a config mapping: schema, model names against the catalog, source parameters."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    try:
        config = RunConfig(**raw)
    except ValidationError as err:
        raise ConfigError(_field_errors(err, where)) from None
    try:
        catalog = load_catalog(*config.catalog)
    except CatalogError as err:
        raise ConfigError(f"{where}: field 'catalog': {err}") from None
    for i, name in enumerate(config.models):
        if name not in catalog:
            raise ConfigError(
                f"{where}: field 'models.{i}': unknown model '{name}'; the "
                f"catalog has: {', '.join(sorted(catalog))}"
            )
    _check_metrics(config.align, where)
    seen = set()
    for i, ds in enumerate(config.datasets):
        if ds.name in seen:
            raise ConfigError(f"{where}: field 'datasets.{i}.name': duplicate dataset '{ds.name}'")
        seen.add(ds.name)
        problem = check_params(ds.source, ds.params)
        if problem:
            raise ConfigError(f"{where}: field 'datasets.{i}': {problem}")
    return config


def check_align(raw: dict, where: str) -> AlignConfig:
    """An ``align`` section (from a config or the command line's flags), validated."""
    try:
        align = AlignConfig(**raw)
    except ValidationError as err:
        raise ConfigError(_field_errors(err, where).replace("field '", "field 'align.")) from None
    _check_metrics(align, where)
    return align


def _check_metrics(align: AlignConfig, where: str) -> None:
    from vlray.metrics import METRICS

    for i, metric in enumerate(align.metrics):
        if metric not in METRICS:
            raise ConfigError(
                f"{where}: field 'align.metrics.{i}': unknown metric '{metric}'; "
                f"known: {', '.join(METRICS)}"
            )
    for study in ("perturbation", "exemplar"):
        for i, metric in enumerate(getattr(align, study).metrics or []):
            if metric not in METRICS:
                raise ConfigError(
                    f"{where}: field 'align.{study}.metrics.{i}': unknown metric '{metric}'; "
                    f"known: {', '.join(METRICS)}"
                )
    for metric in align.metric_kwargs:
        if metric not in align.metrics:
            raise ConfigError(
                f"{where}: field 'align.metric_kwargs.{metric}': not one of align.metrics"
            )


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"config {path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path}: not valid YAML: {err}") from None
    return validate_config(raw, f"config {path}")
