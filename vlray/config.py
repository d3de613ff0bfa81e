"""Run configs (YAML), validated on load: a bad field fails before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlray.catalog import CatalogError, ModelSpec, load_catalog
from vlray.errors import VlrayError
from vlray.options import AlignOptions, ExtractOptions, field_errors
from vlray.sources import check_params


class ConfigError(VlrayError, ValueError):
    """A config that cannot run; the message names the file and the field."""


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str
    params: dict[str, Any] = Field(default_factory=dict)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[DatasetConfig] = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    catalog: list[str] = Field(default_factory=list)
    # The sections are the runtime options themselves: one definition of every default.
    extract: ExtractOptions = Field(default_factory=ExtractOptions)
    align: AlignOptions = Field(default_factory=AlignOptions)
    lake: str | None = None

    def specs(self) -> list[ModelSpec]:
        catalog = load_catalog(*self.catalog)
        return [catalog[name] for name in self.models]


def validate_config(raw: dict, where: str) -> RunConfig:
    """Check a config mapping: schema, model names against the catalog, source parameters."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    try:
        config = RunConfig(**raw)
    except ValidationError as err:
        raise ConfigError(field_errors(err, where)) from None
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
    for i, name in enumerate(config.extract.unperturbed_only):
        if name not in config.models:
            raise ConfigError(
                f"{where}: field 'extract.unperturbed_only.{i}': '{name}' is not one of this "
                f"config's models ({', '.join(config.models)})"
            )
    for name in config.align.model_studies:
        if name not in config.models:
            raise ConfigError(
                f"{where}: field 'align.model_studies.{name}': '{name}' is not one of this "
                f"config's models ({', '.join(config.models)})"
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


def check_align(raw: dict, where: str) -> AlignOptions:
    """An ``align`` section (from a config or the command line's flags), validated."""
    try:
        align = AlignOptions(**raw)
    except ValidationError as err:
        raise ConfigError(field_errors(err, where).replace("field '", "field 'align.")) from None
    _check_metrics(align, where)
    return align


def _check_metrics(align: AlignOptions, where: str) -> None:
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
