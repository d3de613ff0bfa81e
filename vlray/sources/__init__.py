"""Sources: where items come from.

A source is a function ``load(dataset, **params)`` returning ``(items, quarantine)`` or
``(items, quarantine, extras)``: an items table (``vlray.items.ITEMS_SCHEMA``), the rows it
refused (``QUARANTINE_SCHEMA``), and optionally a dict of extra tables by name (``"trials"``,
``"concepts"``; see ``vlray.items.EXTRA_TABLES``). Adding a data set format is one function and
one entry in ``SOURCES``.

Loaders of real formats (``coco``, ``pickapic``, ``imagefolder``, ``parquet``,
``webdataset``) live in their own modules and are imported on first use, so that importing
this package (every CLI command does, to validate configs) stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from vlray.errors import VlrayError
from vlray.items import EXTRA_TABLES, ITEMS_SCHEMA, QUARANTINE_SCHEMA, fit_schema, quarantine_table


class SourceError(VlrayError, ValueError):
    """A dataset that cannot be loaded at all; the message names the file (and column, row)."""


@dataclass(frozen=True)
class SourceOutput:
    """What a source produced: items, refused rows, and extra tables by name."""

    items: pa.Table
    quarantine: pa.Table
    tables: dict[str, pa.Table] = field(default_factory=dict)


class _Lazy:
    """A loader ``module:function`` imported on first call (or signature check)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def target(self) -> Callable[..., tuple]:
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args, **kwargs) -> tuple:
        return self.target()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.target())


def _shapes(dataset: str, **params) -> tuple[pa.Table, pa.Table, dict[str, pa.Table]]:
    """The shapes world: its items, no refused rows, and its ``trials`` and ``concepts``."""
    from vlray.sources.shapes import world

    items, tables = world(**params)
    return items, quarantine_table([]), tables


def _manifest(dataset: str, manifest: str, root: str) -> tuple[pa.Table, pa.Table]:
    from vlray.sources.manifest import load_manifest

    return load_manifest(manifest, root, dataset)


def _signature_of(source: str) -> inspect.Signature:
    if source == "shapes":
        from vlray.sources.shapes import generate

        return inspect.signature(generate)
    return inspect.signature(SOURCES[source])


SOURCES: dict[str, Callable[..., tuple]] = {
    "shapes": _shapes,
    "manifest": _manifest,
    "coco": _Lazy("vlray.sources.coco", "load_coco"),
    "pickapic": _Lazy("vlray.sources.pickapic", "load_pickapic"),
    "imagefolder": _Lazy("vlray.sources.imagefolder", "load_imagefolder"),
    "parquet": _Lazy("vlray.sources.parquet", "load_parquet"),
    "webdataset": _Lazy("vlray.sources.webdataset", "load_webdataset"),
}


def check_params(source: str, params: dict) -> str | None:
    """Why ``params`` do not fit ``source`` (a message naming the parameter), or None."""
    if source not in SOURCES:
        return f"unknown source '{source}'; known: {', '.join(sorted(SOURCES))}"
    sig = _signature_of(source)
    names = [n for n in sig.parameters if n != "dataset"]
    unknown = [k for k in params if k not in names]
    if unknown:
        return f"unknown parameter '{unknown[0]}' for source '{source}' (takes: {', '.join(names)})"
    missing = [
        n
        for n, p in sig.parameters.items()
        if n != "dataset"
        and p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and n not in params
    ]
    if missing:
        return f"missing parameter '{missing[0]}' for source '{source}'"
    return None


def _normalise(source: str, dataset: str, out: object) -> SourceOutput:
    """A source's tuple as ``SourceOutput``, every table cast to its schema."""
    where = f"dataset '{dataset}': source '{source}'"
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise TypeError(f"{where} must return (items, quarantine[, tables])")
    items, quarantine = out[0].cast(ITEMS_SCHEMA), out[1].cast(QUARANTINE_SCHEMA)
    tables = {}
    extras = (out[2] if len(out) == 3 else None) or {}
    for name, table in extras.items():
        if name not in EXTRA_TABLES:
            raise SourceError(
                f"{where} returned an unknown table '{name}' (known: {', '.join(EXTRA_TABLES)})"
            )
        try:
            # a column added since the source was written (a trial's kind) is null
            tables[name] = fit_schema(table, EXTRA_TABLES[name])
        except (KeyError, ValueError, pa.ArrowException) as err:
            problem = f"{where}: its '{name}' table does not fit the schema: {err}"
            raise SourceError(problem) from None
    return SourceOutput(items, quarantine, tables)


def load_source(source: str, dataset: str, params: dict) -> SourceOutput:
    """Run a source: the items of one dataset, the rows it quarantined, and its extra tables."""
    problem = check_params(source, params)
    if problem:
        raise SourceError(f"dataset '{dataset}': {problem}")
    return _normalise(source, dataset, SOURCES[source](dataset, **params))
