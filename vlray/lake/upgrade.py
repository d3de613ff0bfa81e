"""``vlray lake upgrade``: convert a lake of vlray 0.1's layout (plain hive-partitioned Parquet,
a ``_manifest/`` folder, a process-id ``_lock``) into Delta tables, in place, without
re-embedding anything.

The old files are read where they lie and written again as the new tables' files (same rows,
the new schemas: ``layer`` a partition column, embeddings as ``list<float32>``, the items
fingerprint and the results' inputs hash as columns instead of Parquet metadata), then
committed: one transaction per table (embeddings: one per (dataset, model), each followed by
its manifest records). Only after every commit succeeded are the old files deleted, and
``_manifest/`` last of all: while it exists, vlray refuses the lake and ``upgrade`` knows it
has work left.

A lake already in Delta tables whose results were written before a score's metric and
condition had typed columns (``top_k``, ``drop_of``, ``k``, ``direction``, ...) gets them: the
``alignment`` table is rewritten in one transaction, each row's parts read from its ``metric``
and ``condition`` labels (``legacy_metric`` and ``legacy_condition``, the one reader of the
packed formats). A 0.1 lake's results get them as they are converted.

A lake of vlray 0.3 gets the columns 0.4 added, each filled with what is known without
recomputing a score: in ``alignment``, ``trial_kind`` null (no earlier row had a kind),
``null_sd`` null (the null's replicates were not kept), ``calibrated`` = value - null_mean
where the null mean is known (``results.calibrate``) and ``z_score`` null; in ``trials``,
``kind`` null. Each table is rewritten in one transaction.

Killed midway, ``upgrade`` is simply run again. Each commit carries the unit it converted in
its commit metadata (``vlray.upgrade``), so a re-run skips what is already committed and
converts the rest (a partly converted unit was never committed: its new files are
unreferenced, and ``vlray lake vacuum`` deletes them). Old files are found by their 0.1 names
(``part-00000.parquet``, ``part-L003-...parquet``, ...), which no new file has, never by being
unreferenced.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vlray.items import (
    EXTRA_TABLES,
    ITEMS_SCHEMA,
    NO_PERTURBATION,
    QUARANTINE_SCHEMA,
    fit_schema,
    perturbation_family,
)
from vlray.lake import delta
from vlray.lake.fingerprints import ItemsFingerprint
from vlray.lake.lake import UPGRADED_COLUMNS, Lake, code_version
from vlray.lake.storage import LakeError, Storage, _one_line
from vlray.lake.tables import MANIFEST_SCHEMA, TABLES, TableSpec
from vlray.results import (
    ALIGNMENT_SCHEMA,
    CONDITION_COLUMNS,
    CONDITION_FIELDS,
    METRIC_COLUMNS,
    METRIC_FIELDS,
    Condition,
    Metric,
    calibrate,
)

# What vlray 0.1 wrote in Parquet schema metadata.
FINGERPRINT_KEY = b"vlray.items_fingerprint"
INPUTS_KEY = b"vlray.inputs_hash"
# The commit metadata key naming the unit an upgrade commit converted.
UNIT_KEY = "vlray.upgrade"

OLD_MANIFEST_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("model", pa.string()),
        ("perturbation", pa.string()),
        ("model_revision", pa.string()),
        ("config_hash", pa.string()),
        ("rows", pa.int64()),
        ("items", pa.int64()),
        ("layers", pa.int32()),
        ("layer_names", pa.string()),  # a JSON list
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("code_version", pa.string()),
        ("run_id", pa.string()),
    ]
)

# The names vlray 0.1 gave its files, relative to each table's folder. New files never match
# them: write_file names them part-<stem>-<12 hex>.parquet (the stems below start with
# "upgrade" or a run id), delta-rs part-NNNNN-<uuid>-c000.snappy.parquet, and new embeddings
# files sit one folder deeper (layer=L/).
_SEG = r"([^/]+)"
OLD_FILES = {
    "items": re.compile(rf"^dataset={_SEG}/part-\d{{5}}\.parquet$"),
    "embeddings": re.compile(
        rf"^dataset={_SEG}/model={_SEG}/perturbation={_SEG}/part-L\d{{3}}-[^/]*\.parquet$"
    ),
    "quarantine": re.compile(rf"^dataset={_SEG}/part-(?:source|model-[^/]*)\.parquet$"),
    "trials": re.compile(rf"^dataset={_SEG}/part-0\.parquet$"),
    "concepts": re.compile(rf"^dataset={_SEG}/part-0\.parquet$"),
    "alignment": re.compile(rf"^study={_SEG}/part-[^/]*--[^/]*--[^/]*\.parquet$"),
}
# Left by 0.1 runs: the writer lock, staged work of killed runs, partitions being replaced.
OLD_LEFTOVERS = ("_lock", "_staging", "_trash")
OLD_MANIFEST = "_manifest"


@dataclass
class _Old:
    """The old-layout files of one table: (relative path, partition values) in name order."""

    spec: TableSpec
    files: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def full(self, store: Storage, relative: str) -> str:
        return store.path(self.spec.path, relative)

    def by_partition(self) -> dict[tuple[str, ...], list[str]]:
        out: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for relative, values in self.files:
            out[values].append(relative)
        return dict(out)


def upgrade(lake: Lake) -> Iterator[str]:
    """Convert ``lake`` from vlray 0.1's layout in place; yields a line per step for people.
    A lake in the Delta layout gets the columns its results, trials or concepts lack (the
    metric's and condition's parts, the null-calibrated scores, the trials' kind), and is
    otherwise left as it is (one line says so)."""
    store = lake.storage
    store.check_reachable(write=False)
    if not store.exists():
        raise LakeError(f"no lake at {lake.uri}")
    old = {name: _list_old(store, TABLES[name]) for name in OLD_FILES}
    if not (
        store.exists(OLD_MANIFEST)
        or any(store.exists(p) for p in OLD_LEFTOVERS)
        or any(entry.files for entry in old.values())
    ):
        lacking = _lacking(store)
        if not lacking:
            yield (
                f"the lake {lake.uri} is already in the current layout (Delta tables); "
                "nothing to upgrade"
            )
            return
        store.check_reachable(write=True)
        yield (
            f"upgrading {lake.uri}: the {' and '.join(lacking)} table(s) get the columns this "
            "vlray writes (nothing is recomputed)"
        )
        yield from _typed_columns(store)
        yield from _extra_columns(store)
        yield f"upgrade: done; {lake.uri} is in the current layout"
        return
    store.check_reachable(write=True)
    _check_no_old_writer(store)
    yield (
        f"upgrading {lake.uri} from vlray 0.1's layout to Delta tables, in place "
        "(nothing is embedded again)"
    )

    items_fps = _items_fingerprints(store, old["items"])
    yield _items(store, old["items"], items_fps)
    yield _quarantine(store, old["quarantine"])
    for name in EXTRA_TABLES:
        yield _extra(store, old[name], name)
    yield from _embeddings(store, old["embeddings"], items_fps)
    yield from _results(store, old["alignment"])
    yield from _typed_columns(store)  # results an older upgrade converted without them
    yield from _extra_columns(store)

    # Every table is committed: the old files go, and _manifest/ last of all.
    deleted = 0
    for entry in old.values():
        for relative, _ in entry.files:
            _delete_file(store, entry.full(store, relative))
            deleted += 1
        if store.is_local:
            _prune_empty_dirs(store, entry)
    removed = []
    for name in (*OLD_LEFTOVERS, OLD_MANIFEST):
        if _delete_any(store, name):
            removed.append(name + ("/" if name != "_lock" else ""))
    yield (
        f"  {'cleanup':<12} deleted {deleted} old-layout file(s)"
        + (f" and {', '.join(removed)}" if removed else "")
    )
    yield (
        f"upgrade: done; {lake.uri} is Delta tables now (`vlray lake history --lake "
        f"{lake.uri}` lists the embeddings commits)"
    )


def _lacking(store: Storage) -> list[str]:
    """The tables (``UPGRADED_COLUMNS``) whose latest snapshot lacks columns of this vlray."""
    return [
        name
        for name in UPGRADED_COLUMNS
        if delta.missing_columns(TABLES[name], delta.open_table(store, TABLES[name]))
    ]


# --- finding the old files -----------------------------------------------------------------


def _list_old(store: Storage, spec: TableSpec) -> _Old:
    """The table's files with 0.1 names. A table with a Delta log and no ``_manifest/``
    beside it has none left (an upgrade deletes ``_manifest/`` after every old file), so a
    lake in the new layout is never listed file by file."""
    pattern = OLD_FILES[spec.name]
    out = _Old(spec)
    root = store.path(spec.path)
    if not store.exists(spec.path):
        return out
    if store.exists(spec.path, "_delta_log") and not store.exists(OLD_MANIFEST):
        return out
    try:
        infos = store.fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as err:
        raise LakeError(f"cannot list {store.uri_of(spec.path)}: {_one_line(err)}") from None
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(root) :].lstrip("/")
        match = pattern.match(relative)
        if match:
            out.files.append((relative, tuple(unquote(v) for v in match.groups())))
    out.files.sort()
    return out


def _read(store: Storage, path: str) -> pa.Table:
    try:
        return pq.read_table(path, filesystem=store.fs)
    except OSError as err:
        raise LakeError(f"cannot read {path}: {_one_line(err)}") from None


def _metadata(store: Storage, path: str, key: bytes) -> str | None:
    try:
        meta = pq.read_schema(path, filesystem=store.fs).metadata or {}
    except OSError as err:
        raise LakeError(f"cannot read {path}: {_one_line(err)}") from None
    value = meta.get(key)
    return value.decode() if value else None


def _check_no_old_writer(store: Storage) -> None:
    """Refuse while a vlray 0.1 run may still be writing the lake (its ``_lock`` names a live
    process on this host, or a process on another host)."""
    if not store.exists("_lock"):
        return
    try:
        with store.fs.open_input_stream(store.path("_lock")) as f:
            holder = json.loads(f.read() or b"{}")
    except (OSError, ValueError):
        holder = {}
    if holder.get("host") == socket.gethostname() and holder.get("pid"):
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return  # a dead run's lock
        except (PermissionError, ValueError):
            pass
    elif not holder:
        return  # empty or unreadable: no run holds it
    raise LakeError(
        f"the lake {store.uri} is locked by vlray 0.1 run {holder.get('run_id')} (pid "
        f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}); upgrade "
        f"once it has ended, or delete {store.uri_of('_lock')} if that run is dead"
    )


# --- what earlier (interrupted) upgrades already committed ---------------------------------


def _committed_units(store: Storage, spec: TableSpec) -> dict[str, int]:
    """unit -> the table version whose upgrade commit converted it."""
    table = delta.open_table(store, spec)
    if table is None:
        return {}
    try:
        history = table.history()
    except Exception as err:  # noqa: BLE001 - delta-rs raises several types here
        raise LakeError(f"cannot read the history of {store.uri_of(spec.path)}: {err}") from None
    return {e[UNIT_KEY]: int(e["version"]) for e in history if e.get(UNIT_KEY)}


def _meta(unit: str) -> dict[str, str]:
    return {UNIT_KEY: unit, "vlray.code_version": code_version()}


def _convert_partitioned(
    store: Storage,
    old: _Old,
    unit: str,
    read_partition,
) -> tuple[int, int, bool]:
    """Write every partition of ``old`` (``read_partition(values, files) -> [(table,
    partition)]``) as new files and commit them in one transaction that replaces those
    partitions. Returns (files written, rows, skipped because already committed)."""
    spec = old.spec
    if unit in _committed_units(store, spec):
        return 0, 0, True
    adds, rows = [], 0
    partitions = old.by_partition()
    for values, files in partitions.items():
        for i, (table, partition) in enumerate(read_partition(values, files)):
            if table.num_rows == 0:
                continue
            adds.append(delta.write_file(store, spec, table, partition, f"upgrade-{i:05d}"))
            rows += table.num_rows
    column = spec.partition_by[0]
    values = sorted({v[0] for v in partitions})
    delta.commit_files(store, spec, adds, {column: values}, _meta(unit))
    return len(adds), rows, False


def _line(name: str, text: str, skipped: bool) -> str:
    if skipped:
        text = "already converted (by an earlier, interrupted upgrade)"
    return f"  {name:<12} {text}"


# --- items, quarantine, trials, concepts ---------------------------------------------------


def _items_fingerprints(store: Storage, old: _Old) -> dict[str, str]:
    """dataset -> its items fingerprint, as 0.1 kept it in the items files' metadata (or
    computed again, for files without it)."""
    out = {}
    for (dataset,), files in old.by_partition().items():
        value = _metadata(store, old.full(store, files[0]), FINGERPRINT_KEY)
        if value is None:
            items = pa.concat_tables(
                _read(store, old.full(store, f)).cast(ITEMS_SCHEMA) for f in files
            )
            value = ItemsFingerprint.of(items).dataset
        out[dataset] = value
    return out


def _items(store: Storage, old: _Old, fingerprints: dict[str, str]) -> str:
    if not old.files:
        return _line("items", "nothing to convert", False)

    def read(values, files):
        (dataset,) = values
        for f in files:
            table = _read(store, old.full(store, f)).cast(ITEMS_SCHEMA)
            table = table.append_column(
                "items_fingerprint",
                pa.array([fingerprints[dataset]] * table.num_rows, pa.string()),
            )
            yield table, {"dataset": dataset}

    n, rows, skipped = _convert_partitioned(store, old, "items", read)
    datasets = len(old.by_partition())
    return _line(
        "items",
        f"{datasets} dataset(s): {rows} rows in {n} file(s), each row with its dataset's "
        "items fingerprint",
        skipped,
    )


def _quarantine(store: Storage, old: _Old) -> str:
    if not old.files:
        return _line("quarantine", "nothing to convert", False)

    def read(values, files):
        (dataset,) = values
        tables = [_read(store, old.full(store, f)).cast(QUARANTINE_SCHEMA) for f in files]
        yield pa.concat_tables(tables), {"dataset": dataset}

    _, rows, skipped = _convert_partitioned(store, old, "quarantine", read)
    return _line(
        "quarantine",
        f"{len(old.by_partition())} dataset(s): {rows} refused row(s) from {len(old.files)} "
        "file(s)",
        skipped,
    )


def _extra(store: Storage, old: _Old, name: str) -> str:
    if not old.files:
        return _line(name, "nothing to convert", False)

    def read(values, files):
        (dataset,) = values
        for f in files:
            table = _read(store, old.full(store, f)).replace_schema_metadata(None)
            yield fit_schema(table, EXTRA_TABLES[name]), {"dataset": dataset}

    _, rows, skipped = _convert_partitioned(store, old, name, read)
    return _line(name, f"{len(old.by_partition())} dataset(s): {rows} rows", skipped)


# --- embeddings and the manifest -----------------------------------------------------------


def _old_manifest(store: Storage) -> pa.Table:
    """0.1's manifest: the newest record per (dataset, model, perturbation)."""
    folder = store.path(OLD_MANIFEST)
    if not store.exists(OLD_MANIFEST):
        return OLD_MANIFEST_SCHEMA.empty_table()
    infos = store.fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    files = sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )
    if not files:
        return OLD_MANIFEST_SCHEMA.empty_table()
    table = pa.concat_tables(_read(store, f).cast(OLD_MANIFEST_SCHEMA) for f in files)
    table = table.sort_by([("created_at", "descending")])
    keys = zip(*(table[c].to_pylist() for c in ("dataset", "model", "perturbation")), strict=True)
    seen: set[tuple] = set()
    keep = [i for i, k in enumerate(keys) if not (k in seen or seen.add(k))]
    return table.take(keep).sort_by(
        [("dataset", "ascending"), ("model", "ascending"), ("perturbation", "ascending")]
    )


_CONFIG_HASH = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})$")


def _new_record(old: dict, items_fps: dict[str, str], catalog: dict, version: int) -> dict:
    """A 0.1 manifest record in the new schema. ``config_hash`` is the model spec's
    fingerprint and that of the items it was computed from, so the items fingerprint comes
    from it (else: the dataset's); ``init`` is the catalog's if the spec is still the one
    that computed it, else unknown (null)."""
    match = _CONFIG_HASH.match(old["config_hash"] or "")
    spec = catalog.get(old["model"])
    init = spec.init if spec is not None and match and spec.fingerprint() == match[1] else None
    names = old["layer_names"]
    return {
        **old,
        "layer_names": json.loads(names) if names else None,
        "init": init,
        "items_fingerprint": match[2] if match else items_fps.get(old["dataset"]),
        "embeddings_version": version,
    }


def _embedding_tables(store: Storage, old: _Old, relative: str):
    """An old layer file as (rows, layer) per layer value it holds (one, as 0.1 wrote them)."""
    table = _read(store, old.full(store, relative))
    table = table.replace_schema_metadata(None)
    layers = pc.unique(table["layer"]).to_pylist()
    for layer in sorted(layers):
        rows = table if len(layers) == 1 else table.filter(pc.field("layer") == layer)
        yield rows.drop_columns(["layer"]), int(layer)


def _embeddings(store: Storage, old: _Old, items_fps: dict[str, str]) -> Iterator[str]:
    from vlray.catalog import load_catalog

    spec, manifest_spec = TABLES["embeddings"], TABLES["manifest"]
    records = _old_manifest(store).to_pylist()
    by_job: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        by_job[(r["dataset"], r["model"])].append(r)
    files_by_partition = old.by_partition()
    committed_partitions = {(r["dataset"], r["model"], r["perturbation"]) for r in records}
    orphans = [p for p in files_by_partition if p not in committed_partitions]
    try:
        catalog = load_catalog()
    except Exception:  # noqa: BLE001 - init is only derived when the catalog loads
        catalog = {}

    done = _committed_units(store, spec)
    done_manifest = _committed_units(store, manifest_spec)
    n_files = n_rows = n_skipped = 0
    versions = []
    for (dataset, model), job in sorted(by_job.items()):
        unit = f"embeddings:{dataset}/{model}"
        perturbations = sorted(r["perturbation"] for r in job)
        if unit in done:
            version = done[unit]
            n_skipped += 1
        else:
            adds = []
            for perturbation in perturbations:
                for i, relative in enumerate(
                    files_by_partition.get((dataset, model, perturbation), [])
                ):
                    for rows, layer in _embedding_tables(store, old, relative):
                        partition = {
                            "dataset": dataset,
                            "model": model,
                            "perturbation": perturbation,
                            "layer": layer,
                        }
                        stem = f"upgrade-L{layer:03d}-{i:05d}"
                        adds.append(delta.write_file(store, spec, rows, partition, stem))
                        n_rows += rows.num_rows
            n_files += len(adds)
            version = delta.commit_files(
                store,
                spec,
                adds,
                {"dataset": dataset, "model": model, "perturbation": perturbations},
                {**_meta(unit), "vlray.dataset": dataset, "vlray.model": model},
            )
        versions.append(version)
        if unit not in done_manifest:
            new_records = [_new_record(r, items_fps, catalog, version) for r in job]
            delta.replace_rows(
                store,
                manifest_spec,
                pa.Table.from_pylist(new_records, MANIFEST_SCHEMA),
                None,
                _meta(unit),
            )
    if not by_job and not orphans:
        yield _line("embeddings", "nothing to convert", False)
        return
    text = (
        f"{len(by_job)} (dataset, model) job(s), {len(records)} partition(s): {n_rows} rows in "
        f"{n_files} file(s)"
    )
    if versions:
        text += f", table versions {min(versions)}-{max(versions)}"
    if n_skipped:
        text += f" ({n_skipped} job(s) already converted by an earlier, interrupted upgrade)"
    yield _line("embeddings", text, False)
    yield _line(
        "manifest",
        f"{len(records)} record(s), the newest of each partition (init from the catalog "
        "where the model's spec is unchanged)",
        False,
    )
    if orphans:
        yield _line(
            "",
            f"{len(orphans)} partition folder(s) with no manifest record (left by a killed "
            "vlray 0.1 run, never committed) are not converted; their files are deleted",
            False,
        )


# --- results -------------------------------------------------------------------------------


def _results(store: Storage, old: _Old) -> Iterator[str]:
    if not old.files:
        yield _line("alignment", "nothing to convert", False)
        return
    schema = TABLES["alignment"].schema
    unhashed = 0
    unknown = {"metric": 0, "condition": 0}

    def read(values, files):
        nonlocal unhashed
        (study,) = values
        for f in files:
            path = old.full(store, f)
            inputs_hash = _metadata(store, path, INPUTS_KEY)
            unhashed += inputs_hash is None
            table, not_parsed = _with_typed_columns(
                _read(store, path).replace_schema_metadata(None)
            )
            table = _with_null_columns(table)
            for label, n in not_parsed.items():
                unknown[label] += n
            table = table.select(ALIGNMENT_SCHEMA.names).cast(ALIGNMENT_SCHEMA)
            n = table.num_rows
            table = table.append_column("inputs_hash", pa.array([inputs_hash] * n, pa.string()))
            table = table.append_column("embeddings_version", pa.nulls(n, pa.int64()))
            yield table.cast(schema), {"study": study}

    _, rows, skipped = _convert_partitioned(store, old, "alignment", read)
    yield _line(
        "alignment",
        f"{len(old.by_partition())} stud(ies): {rows} score rows from {len(old.files)} file(s)",
        skipped,
    )
    if not skipped:
        yield _line(
            "",
            "embeddings_version left null: which embeddings 0.1's scores were computed from "
            "is unknown\n               (their inputs hash still lets `vlray refresh` tell "
            "current scores from stale ones)",
            False,
        )
    if unhashed:
        text = f"{unhashed} results file(s) had no inputs hash: `vlray refresh` recomputes them"
        yield _line("", text, False)
    yield from _unknown_labels(unknown)


# --- the metric's and the condition's typed columns ------------------------------------------
# Reading the legacy formats, here only: before a score's metric and condition had typed
# columns, the studies packed their parts into the labels (``p@10``, ``cka_drop``; ``k=4/image``,
# ``nn/frequency=low``). The labels are now made from the columns by ``results.Metric.label``
# and ``results.Condition.label``; nothing else parses them.

DROP_SUFFIX = "_drop"  # perturbation: the drop of metric M was labelled M_drop
TOP_K_PREFIX = "p@"  # concept_retrieval: precision at K was labelled p@K


def legacy_metric(study: str, label: str | None) -> Metric | str | None:
    """The typed parts of a ``metric`` label as ``study`` wrote it before the parts had
    columns: a ``Metric``, the label itself for a plain metric (no parts), or None when the
    label is not in that study's format (its parts stay null)."""
    if label is None:
        return None
    try:
        if study == "concept_retrieval":  # p@K, and nothing else
            if not label.startswith(TOP_K_PREFIX):
                return None
            parsed = Metric(top_k=int(label.removeprefix(TOP_K_PREFIX)))
        elif study == "perturbation" and label.endswith(DROP_SUFFIX):  # M_drop, or plain M
            parsed = Metric(drop_of=label.removesuffix(DROP_SUFFIX) or None)
        else:
            return label
    except ValueError:  # K not a number, a drop of no metric
        return None
    # Only a label that the parts make again exactly is taken: nothing is guessed.
    return parsed if parsed.label == label else None


def legacy_condition(study: str, label: str | None) -> Condition | None:
    """The typed parts of a ``condition`` label as ``study`` wrote it before the parts had
    columns; None when the label is not in that study's format (its parts stay null)."""
    if label is None:
        return None
    try:
        if study == "exemplar":  # k=K/SIDE
            k, _, side = label.partition("/")
            name, _, value = k.partition("=")
            if name != "k":
                return None
            parsed = Condition(k=int(value), averaged_side=side or None)
        elif study == "forced_choice":  # DIRECTION
            parsed = Condition(direction=label)
        elif study == "perturbation":  # none | FAMILY/NAME | FAMILY (a family's pooled drop)
            if label == NO_PERTURBATION:
                parsed = Condition(perturbation=label)
            elif "/" in label:
                parsed = Condition(
                    perturbation=label, perturbation_family=perturbation_family(label)
                )
            else:
                parsed = Condition(perturbation_family=label)
        elif study == "concept_retrieval":  # METHOD or METHOD/BREAKDOWN=BIN
            method, _, bin_of = label.partition("/")
            breakdown, _, bin_ = bin_of.partition("=")
            parsed = Condition(retrieval=method, breakdown=breakdown or None, bin=bin_ or None)
        else:  # layerwise: none
            parsed = Condition()
    except ValueError:  # k not a number, a breakdown without its bin
        return None
    # Only a label that the parts make again exactly is taken: nothing is guessed.
    return parsed if parsed.label == label else None


# Typed parts that no label written before the parts had columns holds: an older row has none
# (its forced-choice trials had no kind), so a table lacking only these gets them null.
LATER_PARTS = ("trial_kind",)


def _with_typed_columns(table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """``table`` (results rows with ``study``, ``metric`` and ``condition``) with the metric's
    and the condition's typed columns it lacks: filled from the labels, or null when it lacks
    only ``LATER_PARTS``; and, per label column read, the number of rows whose label is in no
    known format (a label column whose parts were all there, or only ``LATER_PARTS`` missing,
    is not read and has no entry)."""
    unknown = {}
    for column, read, fields in (
        ("metric", legacy_metric, METRIC_FIELDS),
        ("condition", legacy_condition, CONDITION_FIELDS),
    ):
        absent = [f for f in fields if f.name not in table.column_names]
        if all(f.name in LATER_PARTS for f in absent):  # none, or parts no label held
            for f in absent:
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
            continue
        keys = list(zip(table["study"].to_pylist(), table[column].to_pylist(), strict=True))
        parsed = {key: read(*key) for key in set(keys)}  # a few distinct labels
        table = table.drop_columns([f.name for f in fields if f.name in table.column_names])
        for f in fields:
            # a plain metric (its label, a str) has no parts: null
            values = [getattr(parsed[key], f.name, None) for key in keys]
            table = table.append_column(f, pa.array(values, f.type))
        unknown[column] = sum(parsed[key] is None for key in keys)
    return table, unknown


# The null-calibrated statistics (vlray 0.4): what a table written without them gets.
NULL_COLUMNS = ("null_sd", "calibrated", "z_score")


def _with_null_columns(table: pa.Table) -> pa.Table:
    """``table`` (results rows with ``value`` and ``null_mean``) with the null-calibrated
    columns it lacks: ``null_sd`` null (the null's replicates were not kept), and
    ``calibrated`` and ``z_score`` from ``results.calibrate`` (so ``calibrated`` =
    value - null_mean where the null mean is known, ``z_score`` null without a spread)."""
    if all(name in table.column_names for name in NULL_COLUMNS):
        return table
    if "null_sd" not in table.column_names:
        table = table.append_column("null_sd", pa.nulls(table.num_rows, pa.float64()))
    scores = [
        calibrate(value, mean, sd)
        for value, mean, sd in zip(
            table["value"].to_pylist(),
            table["null_mean"].to_pylist(),
            table["null_sd"].to_pylist(),
            strict=True,
        )
    ]
    for i, name in enumerate(("calibrated", "z_score")):
        if name not in table.column_names:
            values = pa.array([s[i] for s in scores], pa.float64())
            table = table.append_column(name, values)
    return table


def _unknown_labels(unknown: dict[str, int]) -> Iterator[str]:
    """The lines that say how many rows' labels were left unread, per label column."""
    parts = {"metric": METRIC_COLUMNS, "condition": CONDITION_COLUMNS}
    for column, n in unknown.items():
        if n:
            text = (
                f"{n} score row(s) have a {column} label in no study's format: their "
                f"{column} columns ({', '.join(parts[column])}) are left null"
            )
            yield _line("", text, False)


def _typed_columns(store: Storage) -> Iterator[str]:
    """Add the columns an ``alignment`` table was written without (the metric's and the
    condition's typed parts, the null-calibrated statistics, or some of them): one transaction
    that rewrites its rows, the parts read again from the labels where they are missing (the
    whole table is read into memory once)."""
    spec = TABLES["alignment"]
    missing = delta.missing_columns(spec, delta.open_table(store, spec))
    if not missing:
        return
    counts: dict = {"rows": 0, "unknown": {}, "missing": missing}

    def rows_of(table) -> pa.Table:
        # the snapshot's own columns: those it lacks read as null, and are made here
        counts["missing"] = lacking = delta.missing_columns(spec, table)
        rows = delta.snapshot_dataset(store, spec, table).to_table().drop_columns(lacking)
        rows, counts["unknown"] = _with_typed_columns(rows)
        counts["rows"] = rows.num_rows
        return _with_null_columns(rows)

    version = delta.rewrite_table(store, spec, rows_of, _meta("alignment:typed-columns"))
    n, missing = counts["rows"], counts["missing"]
    read = {"metric": METRIC_COLUMNS, "condition": CONDITION_COLUMNS}
    parsed = [c for label in counts["unknown"] for c in read[label]]
    if parsed:
        labels = " and ".join(counts["unknown"])
        text = f"{n} score rows: columns {', '.join(parsed)} filled from their {labels} labels"
        yield _line("alignment", f"{text} (table version {version})", False)
    later = [c for c in LATER_PARTS if c in missing and c not in parsed]
    if later:
        text = f"{n} score rows: column(s) {', '.join(later)} null (no earlier score had them)"
        yield _line("alignment", f"{text} (table version {version})", False)
    if any(c in missing for c in NULL_COLUMNS):
        text = (
            f"{n} score rows: columns {', '.join(NULL_COLUMNS)} added: calibrated = value - "
            "null_mean where the null mean is known; null_sd and z_score left null (the\n"
            "               null's replicates were not kept: `vlray align` scores again "
            f"with them) (table version {version})"
        )
        yield _line("alignment", text, False)
    yield from _unknown_labels(counts["unknown"])


def _extra_columns(store: Storage) -> Iterator[str]:
    """Add the columns a ``trials`` or ``concepts`` table was written without (the trials'
    ``kind``), null: one transaction per table that rewrites its rows."""
    for name in EXTRA_TABLES:
        spec = TABLES[name]
        missing = delta.missing_columns(spec, delta.open_table(store, spec))
        if not missing:
            continue
        counts = {"rows": 0}

        def rows_of(table, spec=spec, counts=counts) -> pa.Table:
            # what the snapshot lacks reads as null through the table's schema
            rows = delta.snapshot_dataset(store, spec, table).to_table()
            counts["rows"] = rows.num_rows
            return rows

        version = delta.rewrite_table(store, spec, rows_of, _meta(f"{name}:columns"))
        text = (
            f"{counts['rows']} rows: column(s) {', '.join(missing)} added, null (written "
            f"before they existed) (table version {version})"
        )
        yield _line(name, text, False)


# --- deleting ------------------------------------------------------------------------------


def _delete_file(store: Storage, path: str) -> None:
    try:
        store.fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise LakeError(f"cannot delete {path}: {_one_line(err)}") from None


def _delete_any(store: Storage, name: str) -> bool:
    """Delete a file or folder under the lake root; False if there was none."""
    path = store.path(name)
    try:
        info = store.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return False
        if info.type == pafs.FileType.Directory:
            store.fs.delete_dir(path)
        else:
            store.fs.delete_file(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise LakeError(f"cannot delete {path}: {_one_line(err)}") from None
    return True


def _prune_empty_dirs(store: Storage, old: _Old) -> None:
    """Remove the local folders the deleted files leave empty (object stores have none)."""
    dirs = set()
    for relative, _ in old.files:
        parts = relative.split("/")[:-1]
        for n in range(len(parts), 0, -1):
            dirs.add("/".join(parts[:n]))
    for relative in sorted(dirs, key=lambda d: -d.count("/")):
        path = old.full(store, relative)
        try:
            if not os.listdir(path):
                os.rmdir(path)
        except OSError:
            pass
