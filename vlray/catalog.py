"""The model catalog: named model specs, validated on load.

Like timm's registry, a model is one entry (``vlray/catalog.yaml`` or a user catalog file) and
``vlray.models.create_model(spec)`` is the single way to build any of them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlray.errors import VlrayError
from vlray.hashing import json_hash
from vlray.options import field_errors
from vlray.pooling import POOLINGS

BUILTIN_CATALOG = Path(__file__).with_name("catalog.yaml")
METADATA_FIELDS = frozenset({"imagenet_top1"})  # describe a model, never change its embeddings


class CatalogError(VlrayError, ValueError):
    """A catalog file or model name that cannot be used; the message names the field."""


class ModelSpec(BaseModel):
    """One catalog entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    modality: Literal["vision", "language"]
    source: Literal["timm", "hf", "packaged"]
    id: str
    arch: str | None = None
    revision: str | None = None
    init: Literal["pretrained", "random"] = "pretrained"
    layers: Literal["all"] | list[str | int] = "all"
    pooling: list[str] = Field(default_factory=lambda: ["mean"])
    kwargs: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = None
    max_length: int = Field(default=128, ge=8)
    trust_remote_code: bool = False
    seed: int = 0  # random-init weights are seeded so a control is the same net every run
    # The weights' published ImageNet top-1 accuracy (%), to order a size series; metadata only.
    imagenet_top1: float | None = Field(default=None, gt=0, le=100)

    @field_validator("pooling")
    @classmethod
    def _known_poolings(cls, v: list[str]) -> list[str]:
        allowed = [p for p in POOLINGS if p != "word_span"]
        bad = [p for p in v if p not in allowed]
        if bad or not v:
            raise ValueError(f"pooling must be a non-empty list of {allowed}, got {v}")
        return v

    @property
    def image_modality(self) -> bool:
        return self.modality == "vision"

    def fingerprint(self) -> str:
        """Hash of everything that changes the embeddings (revision, layers, pooling, ...).

        Metadata that does not (``imagenet_top1``) is left out, so adding it keeps a model's
        fingerprint and the embeddings already extracted with it."""
        return json_hash(self.model_dump(exclude=METADATA_FIELDS))


def parse_catalog(entries: dict, where: str) -> dict[str, ModelSpec]:
    """Validate a mapping ``name -> fields`` into specs; errors name the entry and field."""
    if not isinstance(entries, dict):
        raise CatalogError(f"{where}: a catalog is a mapping of model name to fields")
    specs = {}
    for name, fields in entries.items():
        if not isinstance(fields, dict):
            raise CatalogError(f"{where}: model '{name}': expected a mapping of fields")
        try:
            specs[name] = ModelSpec(name=name, **fields)
        except ValidationError as err:
            raise CatalogError(field_errors(err, f"{where}: model '{name}'")) from None
    return specs


@cache
def _builtin() -> dict[str, ModelSpec]:
    return parse_catalog(yaml.safe_load(BUILTIN_CATALOG.read_text()), str(BUILTIN_CATALOG))


def load_catalog(*extra_files: str | Path) -> dict[str, ModelSpec]:
    """The built-in catalog, extended (or overridden by name) by user catalog files."""
    specs = dict(_builtin())
    for path in extra_files:
        path = Path(path)
        try:
            entries = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise CatalogError(f"catalog {path}: cannot read: {err}") from None
        specs.update(parse_catalog(entries or {}, f"catalog {path}"))
    return specs


def get_spec(name: str, catalog: dict[str, ModelSpec] | None = None) -> ModelSpec:
    """Look a model up by name, with the known names in the error."""
    catalog = catalog if catalog is not None else load_catalog()
    if name not in catalog:
        known = ", ".join(sorted(catalog))
        raise CatalogError(f"unknown model '{name}'; the catalog has: {known}")
    return catalog[name]
