"""Sources: where items come from.

A source is a function ``load(dataset, **params) -> (items, quarantine)`` returning an items
table (``vlray.items.ITEMS_SCHEMA``) and the rows it refused (``QUARANTINE_SCHEMA``). Adding a
data set format is one function and one entry in ``SOURCES``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pyarrow as pa

from vlray.items import quarantine_table


def _shapes(dataset: str, **params) -> tuple[pa.Table, pa.Table]:
    from vlray.sources.shapes import generate

    return generate(**params), quarantine_table([])


def _manifest(dataset: str, manifest: str, root: str) -> tuple[pa.Table, pa.Table]:
    from vlray.sources.manifest import load_manifest

    return load_manifest(manifest, root, dataset)


def _signature_of(source: str) -> inspect.Signature:
    if source == "shapes":
        from vlray.sources.shapes import generate

        return inspect.signature(generate)
    return inspect.signature(SOURCES[source])


SOURCES: dict[str, Callable[..., tuple[pa.Table, pa.Table]]] = {
    "shapes": _shapes,
    "manifest": _manifest,
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
        and p.kind is p.POSITIONAL_OR_KEYWORD
        and n not in params
    ]
    if missing:
        return f"missing parameter '{missing[0]}' for source '{source}'"
    return None


def load_source(source: str, dataset: str, params: dict) -> tuple[pa.Table, pa.Table]:
    """Run a source: the items of one dataset, and the rows it quarantined."""
    problem = check_params(source, params)
    if problem:
        raise ValueError(f"dataset '{dataset}': {problem}")
    return SOURCES[source](dataset, **params)
