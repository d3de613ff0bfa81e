"""`vlray lake upgrade`: a lake written by vlray 0.1 (plain Parquet, `_manifest/`) becomes Delta
tables in place, with the same rows and no re-embedding, and the upgrade can be re-run; results
written before a score's metric and condition had typed columns get them, read from their
labels.

tests/data/lake-v0.1 is a real 0.1 lake, made by the code of commit 1672374 from the run config
tests/data/lake-v0.1.yaml (two tiny random models of tests/data/lake-v0.1-catalog.yaml, a
shapes world of two scenes), extract then a quick align:

    git worktree add /tmp/vlray-old 1672374
    mkdir -p /tmp/vlray-old/tests/data
    cp tests/data/lake-v0.1.yaml tests/data/lake-v0.1-catalog.yaml /tmp/vlray-old/tests/data/
    cd /tmp/vlray-old   # not the new checkout: `python -m` puts the working directory first
    export PYTHONPATH=/tmp/vlray-old HF_HUB_OFFLINE=1
    /work/main/.venv/bin/python -m vlray.cli extract --config tests/data/lake-v0.1.yaml \\
        --lake /tmp/oldlake/lake
    /work/main/.venv/bin/python -m vlray.cli align --config tests/data/lake-v0.1.yaml \\
        --lake /tmp/oldlake/lake
    cp -r /tmp/oldlake/lake tests/data/lake-v0.1   # from the new checkout
    git worktree remove --force /tmp/vlray-old
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from vlray.cli import main
from vlray.lake import Lake, LakeError
from vlray.lake import upgrade as upgrade_module
from vlray.results import CONDITION_COLUMNS, METRIC_COLUMNS, Condition, Metric
from vlray.sql import connect, run_query

DATA = Path(__file__).parent / "data"
OLD_LAKE = DATA / "lake-v0.1"
CONFIG = DATA / "lake-v0.1.yaml"
OLD_FILE = re.compile(
    r"(^|/)(_manifest/|_lock$|_staging/|_trash/|items/dataset=[^/]+/part-\d{5}\.parquet$"
    r"|embeddings/dataset=[^/]+/model=[^/]+/perturbation=[^/]+/part-L\d{3}-[^/]*\.parquet$"
    r"|(quarantine|trials|concepts)/dataset=[^/]+/part-(0|source|model-[^/]*)\.parquet$"
    r"|results/alignment/study=[^/]+/part-[^/]*--[^/]*\.parquet$)"
)
EMBEDDING_KEY = ["model", "perturbation", "layer", "pooling", "item_id"]


@pytest.fixture
def old_lake(tmp_path) -> Path:
    """A copy of the 0.1 lake, with what killed 0.1 runs leave: a dead run's lock, staging."""
    lake = tmp_path / "lake"
    shutil.copytree(OLD_LAKE, lake)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (lake / "_lock").write_text(
        json.dumps({"run_id": "dead", "host": os.uname().nodename, "pid": dead.pid})
    )
    (lake / "_staging" / "dead" / "files").mkdir(parents=True)
    (lake / "_staging" / "dead" / "files" / "x.parquet").write_bytes(b"PAR1")
    return lake


def files(lake: Path) -> list[str]:
    return sorted(str(p.relative_to(lake)) for p in lake.rglob("*") if p.is_file())


def old_embeddings(lake: Path) -> list[tuple]:
    """The embeddings rows of a 0.1 lake, read file by file as 0.1 laid them out."""
    rows = []
    for path in sorted((lake / "embeddings").rglob("part-L*.parquet")):
        values = {
            k: unquote(v)
            for k, v in (p.split("=", 1) for p in path.parent.relative_to(lake).parts[1:])
        }
        for r in pq.read_table(path).to_pylist():
            rows.append(
                (
                    values["model"],
                    values["perturbation"],
                    r["layer"],
                    r["pooling"],
                    r["item_id"],
                    tuple(r["embedding"]),
                )
            )
    return sorted(rows)


def old_manifest(lake: Path) -> dict[tuple, dict]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted((lake / "_manifest").iterdir()))
    return {(r["dataset"], r["model"], r["perturbation"]): r for r in table.to_pylist()}


def new_embeddings(lake: str) -> list[tuple]:
    con = connect(lake)
    table = run_query(con, f"SELECT {', '.join(EMBEDDING_KEY)}, embedding FROM embeddings")
    return sorted((*r[:5], tuple(r[5])) for r in zip(*table.to_pydict().values(), strict=True))


def new_rows_schema(name: str) -> pa.Schema:
    from vlray.items import EXTRA_TABLES

    return EXTRA_TABLES[name]


def as_new_rows(name: str, old_rows: pa.Table) -> pa.Table:
    """Old rows of an extra table in its new schema: the columns added since (the trials'
    ``kind``) null."""
    schema = new_rows_schema(name)
    n = old_rows.num_rows
    columns = [
        old_rows[f.name].cast(f.type) if f.name in old_rows.column_names else pa.nulls(n, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def before_trial_kinds(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Results rows (``tests.test_report.build_rows``) as a vlray before 0.4 wrote them: a
    forced-choice row per direction, with no trial kind (the lexical rows: the one kind there
    was), so that every label is in the format of its time."""
    out: dict[str, list[dict]] = {}
    for study, study_rows in rows.items():
        out[study] = [
            {**r, "trial_kind": None, "condition": r["direction"]} if r.get("trial_kind") else r
            for r in study_rows
            if r.get("trial_kind") in (None, "lexical")
        ]
    return out


def assert_calibrated(rows: pa.Table) -> None:
    """Results of an older vlray, upgraded: null_sd and z_score null (not recoverable),
    calibrated = value - null_mean where the null mean is known."""
    for r in rows.to_pylist():
        assert r["null_sd"] is None and r["z_score"] is None, r
        if r["null_mean"] is None:
            assert r["calibrated"] is None, r
        else:
            assert r["calibrated"] == pytest.approx(r["value"] - r["null_mean"], abs=1e-12), r


def upgrade_cli(lake: str, capsys) -> str:
    capsys.readouterr()
    assert main(["lake", "upgrade", "--lake", lake]) == 0
    return capsys.readouterr().out


def assert_typed_columns(rows: pa.Table) -> None:
    """Every results row's typed condition columns make its label again, and so do its metric
    columns where it has any (a plain metric has none)."""
    assert rows.num_rows
    for r in rows.to_pylist():
        assert Condition(**{c: r[c] for c in CONDITION_COLUMNS}).label == r["condition"], r
        parts = {c: r[c] for c in METRIC_COLUMNS}
        if any(v is not None for v in parts.values()):
            assert Metric(**parts).label == r["metric"], r


def assert_upgraded(lake: Path, before: list[tuple], manifest: dict[tuple, dict]) -> None:
    """Same embeddings and manifest as the 0.1 lake, and no 0.1 file left."""
    assert new_embeddings(str(lake)) == before
    records = Lake(str(lake)).manifest().to_pylist()
    assert {(r["dataset"], r["model"], r["perturbation"]): r["rows"] for r in records} == {
        k: r["rows"] for k, r in manifest.items()
    }
    assert [f for f in files(lake) if OLD_FILE.search(f)] == []


def test_a_0_1_lake_is_refused_until_upgraded_then_reads_the_same(old_lake, capsys):
    lake = str(old_lake)
    before, manifest = old_embeddings(old_lake), old_manifest(old_lake)
    items = pa.concat_tables(pq.read_table(p) for p in (old_lake / "items").rglob("*.parquet"))
    fingerprint = pq.read_schema(next((old_lake / "items").rglob("*.parquet"))).metadata[
        b"vlray.items_fingerprint"
    ]
    results = {
        p.parent.name: (pq.read_table(p), pq.read_schema(p).metadata[b"vlray.inputs_hash"])
        for p in (old_lake / "results").rglob("*.parquet")
    }
    assert before and manifest and results

    with pytest.raises(LakeError, match=r"vlray lake upgrade --lake"):
        connect(lake)

    out = upgrade_cli(lake, capsys)
    assert "embeddings   2 (dataset, model) job(s), 13 partition(s): 1704 rows" in out
    assert "embeddings_version left null" in out
    assert out.rstrip().splitlines()[-1].startswith("upgrade: done")
    assert not (old_lake / "_manifest").exists()
    assert not (old_lake / "_lock").exists() and not (old_lake / "_staging").exists()
    assert_upgraded(old_lake, before, manifest)

    # The manifest: 0.1's records, layer names as lists, the items each partition was
    # computed from (the second half of its config hash), the version that holds it.
    new = Lake(lake)
    versions = {
        e["version"]: e for e in new.table("embeddings").history() if e.get("vlray.upgrade")
    }
    for r in new.manifest().to_pylist():
        old = manifest[(r["dataset"], r["model"], r["perturbation"])]
        assert r["layer_names"] == json.loads(old["layer_names"])
        assert r["config_hash"] == old["config_hash"] and r["created_at"] == old["created_at"]
        assert r["items_fingerprint"] == old["config_hash"].split("-")[1]
        assert versions[r["embeddings_version"]]["vlray.model"] == r["model"]
        assert r["init"] is None  # models of a user catalog the upgrade does not see

    # Items carry the fingerprint as a column; results their inputs hash, version unknown.
    stored = new.read_items("shapes")
    assert stored.num_rows == items.num_rows
    assert set(stored["items_fingerprint"].to_pylist()) == {fingerprint.decode()}
    assert new.items_fingerprint("shapes") == fingerprint.decode()
    for study, (table, inputs_hash) in results.items():
        rows = new.read("alignment", {"study": study.split("=", 1)[1]})
        assert rows.num_rows == table.num_rows
        assert set(rows["inputs_hash"].to_pylist()) == {inputs_hash.decode()}
        assert rows["embeddings_version"].null_count == rows.num_rows
        assert_typed_columns(rows)
        assert_calibrated(rows)
        assert all(rows[c].null_count == rows.num_rows for c in METRIC_COLUMNS)  # plain
        assert rows["trial_kind"].null_count == rows.num_rows
    directions = new.read("alignment", {"study": "forced_choice"})["direction"]
    assert set(directions.to_pylist()) == {"text_to_image", "image_to_text"}
    for name in ("trials", "concepts"):
        old_rows = pq.read_table(OLD_LAKE / name / "dataset=shapes" / "part-0.parquet")
        assert new.read_table_for("shapes", name).equals(as_new_rows(name, old_rows))

    # A second upgrade finds nothing to do and changes nothing.
    listing = files(old_lake)
    out = upgrade_cli(lake, capsys)
    assert out.strip().splitlines() == [
        f"the lake {lake} is already in the current layout (Delta tables); nothing to upgrade"
    ]
    assert files(old_lake) == listing


def test_an_upgrade_killed_before_a_commit_completes_when_run_again(old_lake, capsys, monkeypatch):
    before, manifest = old_embeddings(old_lake), old_manifest(old_lake)
    commit = upgrade_module.delta.commit_files
    calls = []

    def dies_at_the_second_model(store, spec, adds, replace, metadata=None):
        calls.append(spec.name)
        if calls.count("embeddings") == 2:
            raise KeyboardInterrupt  # killed, with the second model's files written
        return commit(store, spec, adds, replace, metadata)

    monkeypatch.setattr(upgrade_module.delta, "commit_files", dies_at_the_second_model)
    with pytest.raises(KeyboardInterrupt):
        list(upgrade_module.upgrade(Lake(str(old_lake))))
    monkeypatch.undo()
    assert (old_lake / "_manifest").exists()
    with pytest.raises(LakeError, match="vlray lake upgrade"):
        connect(str(old_lake))

    out = upgrade_cli(str(old_lake), capsys)
    assert "1 job(s) already converted by an earlier, interrupted upgrade" in out
    assert "items        already converted" in out
    assert_upgraded(old_lake, before, manifest)
    assert len(Lake(str(old_lake)).read("manifest")) == len(manifest)  # no record twice


def test_an_upgrade_killed_while_deleting_the_old_files_completes(old_lake, capsys, monkeypatch):
    before, manifest = old_embeddings(old_lake), old_manifest(old_lake)
    delete = upgrade_module._delete_file
    deleted = []

    def dies_halfway(store, path):
        if len(deleted) == 10:
            raise KeyboardInterrupt
        deleted.append(path)
        delete(store, path)

    monkeypatch.setattr(upgrade_module, "_delete_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        list(upgrade_module.upgrade(Lake(str(old_lake))))
    monkeypatch.undo()

    out = upgrade_cli(str(old_lake), capsys)
    assert "embeddings   2 (dataset, model) job(s)" in out and "already converted" in out
    assert_upgraded(old_lake, before, manifest)
    assert len(Lake(str(old_lake)).read("manifest")) == len(manifest)


def _config(tmp_path: Path) -> Path:
    """The run config the 0.1 lake was made with, its catalog path made absolute."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw["catalog"] = [str(DATA / Path(p).name) for p in raw["catalog"]]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# What the shapes world has added since the 0.1 lake was made: binding and relation foils (in
# the unperturbed partition) and two text perturbations. Every other partition's items are
# as they were.
GROWN_SINCE_0_1 = {"none", "text_semantic/role_swap", "text_semantic/remove_object"}


def test_extract_after_the_upgrade_embeds_only_what_changed(old_lake, tmp_path, capsys):
    """The upgrade keeps every partition's fingerprint: with the items written again by
    today's shapes world, extract would embed only the partitions whose items changed since,
    for each model (what ``partitions_to_compute`` gives, which decides every model job)."""
    from vlray.config import load_config
    from vlray.extract import partitions_to_compute
    from vlray.sources import load_source

    upgrade_cli(str(old_lake), capsys)
    lake = Lake(str(old_lake))
    config = load_config(_config(tmp_path))
    (ds,) = config.datasets
    loaded = load_source(ds.source, ds.name, ds.params)
    items = lake.write_items(ds.name, loaded.items, loaded.quarantine, "run-after-upgrade")
    todo = {
        spec.name: set(partitions_to_compute(lake, ds.name, spec, items, config.extract))
        for spec in config.specs()
    }
    # the image perturbations are as they were: only the unperturbed images (new foils)
    assert todo == {"micro_vit_random": {"none"}, "micro_gpt2_random": GROWN_SINCE_0_1}
    assert len(lake.committed(ds.name, "micro_vit_random")) == 7  # six kept, one to redo


def test_an_s3_lake_is_upgraded_in_place(s3_endpoint, capsys):
    bucket = s3_endpoint.new_bucket()
    client = s3_endpoint.client()
    for path in OLD_LAKE.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"vl/{path.relative_to(OLD_LAKE)}")
    lake = f"s3://{bucket}/vl"
    with pytest.raises(LakeError, match="vlray lake upgrade"):
        connect(lake)

    out = upgrade_cli(lake, capsys)
    assert "upgrade: done" in out
    assert new_embeddings(lake) == old_embeddings(OLD_LAKE)
    keys = s3_endpoint.keys(bucket, "vl/")
    assert [k for k in keys if OLD_FILE.search(k[len("vl/") :])] == []
    assert "already in the current layout" in upgrade_cli(lake, capsys)


def test_a_live_0_1_run_holding_the_lock_is_not_upgraded_under(old_lake):
    (old_lake / "_lock").write_text(
        json.dumps({"run_id": "r1", "host": os.uname().nodename, "pid": os.getpid()})
    )
    with pytest.raises(LakeError, match=r"locked by vlray 0.1 run r1 .*delete .*_lock"):
        list(upgrade_module.upgrade(Lake(str(old_lake))))
    assert (old_lake / "_manifest").exists() and not (old_lake / "items" / "_delta_log").exists()


def test_a_partition_the_manifest_never_recorded_is_dropped(old_lake, capsys):
    """0.1 moved a partition into place before recording it: a killed run could leave one
    unrecorded (on an object store, half copied). It was never committed; it goes."""
    before, manifest = old_embeddings(old_lake), old_manifest(old_lake)
    model = old_lake / "embeddings" / "dataset=shapes" / "model=micro_vit_random"
    shutil.copytree(model / "perturbation=none", model / "perturbation=half%2Fcopied")
    out = upgrade_cli(str(old_lake), capsys)
    assert "1 partition folder(s) with no manifest record" in out
    assert_upgraded(old_lake, before, manifest)


def test_init_is_the_catalogs_when_the_spec_that_computed_it_is_unchanged():
    from vlray.catalog import load_catalog

    catalog = load_catalog()
    spec = catalog["tiny_vit_random"]
    old = {
        "dataset": "shapes",
        "model": "tiny_vit_random",
        "perturbation": "none",
        "config_hash": f"{spec.fingerprint()}-0123456789abcdef",
        "layer_names": '["blocks.0"]',
    }
    record = upgrade_module._new_record(old, {"shapes": "f" * 16}, catalog, 3)
    assert (record["init"], record["items_fingerprint"]) == ("random", "0123456789abcdef")
    assert (record["layer_names"], record["embeddings_version"]) == (["blocks.0"], 3)
    changed = upgrade_module._new_record(
        {**old, "config_hash": "0" * 16 + "-0123456789abcdef"}, {}, catalog, 3
    )
    assert changed["init"] is None
    whole = upgrade_module._new_record(
        {**old, "config_hash": "legacy"}, {"shapes": "f" * 16}, {}, 3
    )
    assert (whole["init"], whole["items_fingerprint"]) == (None, "f" * 16)


def _write_results_without(
    lake: Lake, rows: dict[str, list[dict]], columns: tuple[str, ...]
) -> None:
    """Results as vlray wrote them before some of the typed columns (``columns``) existed:
    their labels only, committed as that version did (its table schema lacked the columns)."""
    from vlray.lake import delta
    from vlray.lake.tables import TABLES, TableSpec
    from vlray.results import alignment_table

    spec = TABLES["alignment"]
    schema = pa.schema([f for f in spec.schema if f.name not in columns])
    earlier = TableSpec(spec.name, spec.path, schema, spec.partition_by)
    for study, study_rows in rows.items():
        table = alignment_table(study_rows).drop_columns(list(columns))
        n = table.num_rows
        table = table.append_column("inputs_hash", pa.array(["h"] * n, pa.string()))
        table = table.append_column("embeddings_version", pa.nulls(n, pa.int64()))
        delta.replace_rows(lake.storage, earlier, table, {"study": study})


@pytest.mark.parametrize(
    "lacking",
    [METRIC_COLUMNS + CONDITION_COLUMNS, METRIC_COLUMNS],
    ids=["no-typed-columns", "condition-columns-only"],
)
def test_results_without_the_typed_columns_get_them_from_their_labels(tmp_path, capsys, lacking):
    """A Delta lake whose results predate the typed metric and condition columns (all of them,
    or the metric's only: the condition's came first) is refused (its rows would read as null
    parts) until `vlray lake upgrade` fills them from the labels, once; it then reads and
    reports exactly as the same results written with the columns."""
    from tests.test_report import build_rows
    from vlray.report.data import load
    from vlray.results import alignment_table

    rows = before_trial_kinds(build_rows(True))
    current = Lake(str(tmp_path / "current"))
    for study, study_rows in rows.items():
        current.write_results(alignment_table(study_rows), {"study": study}, "h", "run-test")
    old = Lake(str(tmp_path / "old"))
    _write_results_without(old, rows, lacking)
    before = old.version("alignment")
    time.sleep(0.01)
    written = dt.datetime.now(dt.UTC)  # a snapshot with the labels only
    missing = re.escape(", ".join(lacking))
    with pytest.raises(
        LakeError, match=rf"alignment table of .* without the columns {missing}; .*upgrade"
    ):
        connect(old.uri)

    out = upgrade_cli(old.uri, capsys)
    n = sum(map(len, rows.values()))
    labels = "metric and condition" if "k" in lacking else "metric"
    columns = ", ".join(lacking)
    assert f"alignment    {n} score rows: columns {columns} filled from their {labels} " in out
    assert "label in no study's format" not in out
    assert out.rstrip().splitlines()[-1] == f"upgrade: done; {old.uri} is in the current layout"
    assert old.version("alignment") == before + 1  # one transaction

    query = "SELECT * EXCLUDE (run_id, created_at) FROM alignment ORDER BY ALL"
    upgraded = run_query(connect(old.uri), query)
    assert upgraded.equals(run_query(connect(current.uri), query))
    assert_typed_columns(upgraded)
    assert load(old.uri).rows == load(current.uri).rows
    # The snapshot from before the upgrade is refused too, saying what to read instead.
    with pytest.raises(LakeError, match="a snapshot from after the upgrade"):
        Lake(old.uri, as_of=written).check()
    assert "nothing to upgrade" in upgrade_cli(old.uri, capsys)


def test_only_labels_in_a_studys_format_are_read_into_columns():
    from tests.test_report import build_rows

    for study, rows in before_trial_kinds(build_rows(True)).items():
        for r in rows:
            parts = Condition(**{c: r[c] for c in CONDITION_COLUMNS})
            assert upgrade_module.legacy_condition(study, r["condition"]) == parts
    assert upgrade_module.legacy_condition("exemplar", "k=4") == Condition(k=4)
    # Forced-choice rows now name their trials' kind after the direction; labels written
    # before had none, and are read as they always were.
    assert Condition(direction="text_to_image", trial_kind="binding").label == (
        "text_to_image/binding"
    )
    assert Condition(direction="text_to_image").label == "text_to_image"
    assert upgrade_module.legacy_condition("forced_choice", "image_to_text") == Condition(
        direction="image_to_text"
    )
    for study, label in [
        ("exemplar", "k=four/image"),
        ("exemplar", "4/image"),
        ("concept_retrieval", "nn/frequency"),
        ("layerwise", "mean_pooled"),
        ("perturbation", None),
    ]:
        assert upgrade_module.legacy_condition(study, label) is None, label
    table = pa.table(
        {
            "study": ["exemplar", "exemplar"],
            "metric": ["cka", "cka"],
            "condition": ["k=2/text", "k=x"],
        },
    )
    filled, unknown = upgrade_module._with_typed_columns(table)
    assert unknown == {"metric": 0, "condition": 1}
    assert filled.column_names == [
        "study",
        "metric",
        "condition",
        *METRIC_COLUMNS,
        *CONDITION_COLUMNS,
    ]
    assert filled["k"].to_pylist() == [2, None]
    assert filled["averaged_side"].to_pylist() == ["text", None]
    assert filled["top_k"].null_count == filled["drop_of"].null_count == 2  # plain metrics


def test_only_metric_labels_in_a_studys_format_are_read_into_columns():
    from tests.test_report import build_rows

    for study, rows in build_rows(True).items():
        for r in rows:
            parts = {c: r[c] for c in METRIC_COLUMNS}
            plain = all(v is None for v in parts.values())
            expected = r["metric"] if plain else Metric(**parts)
            assert upgrade_module.legacy_metric(study, r["metric"]) == expected
    assert upgrade_module.legacy_metric("concept_retrieval", "p@5") == Metric(top_k=5)
    assert upgrade_module.legacy_metric("perturbation", "rsa_drop") == Metric(drop_of="rsa")
    assert upgrade_module.legacy_metric("perturbation", "rsa") == "rsa"  # the grid's own
    # Only the perturbation study wrote drops: elsewhere the suffix is part of a plain name.
    assert upgrade_module.legacy_metric("layerwise", "cka_drop") == "cka_drop"
    for study, label in [
        ("concept_retrieval", "p@ten"),
        ("concept_retrieval", "p@05"),
        ("concept_retrieval", "cka"),
        ("perturbation", "_drop"),
        ("layerwise", None),
    ]:
        assert upgrade_module.legacy_metric(study, label) is None, label
    table = pa.table(
        {
            "study": ["concept_retrieval", "concept_retrieval", "perturbation", "perturbation"],
            "metric": ["p@10", "p@x", "cka_drop", "cka"],
            "condition": ["nn", "nn", "image_semantic", "none"],
        },
    )
    filled, unknown = upgrade_module._with_typed_columns(table)
    assert unknown == {"metric": 1, "condition": 0}
    assert filled["top_k"].to_pylist() == [10, None, None, None]
    assert filled["drop_of"].to_pylist() == [None, None, "cka", None]
    assert filled["top_k"].type == pa.int32()


NEW_IN_0_4 = ("trial_kind", "null_sd", "calibrated", "z_score")
SCORE_ORDER = [
    (c, "ascending")
    for c in ("study", "metric", "condition", "vision_model", "language_model")
    + ("vision_layer", "language_layer")
]


def test_a_0_3_lake_gets_the_null_calibrated_columns_and_the_trials_kind(tmp_path, capsys):
    """A lake of vlray 0.3: results without trial_kind, null_sd, calibrated and z_score, trials
    without kind. It is refused until `vlray lake upgrade` adds them, one transaction per table:
    calibrated = value - null_mean where the null mean is known, the rest null; the trials'
    rows are kept, kind null, and new trials with a kind can then be written."""
    from tests.test_report import build_rows
    from vlray.items import TRIALS_SCHEMA, trials_table
    from vlray.lake import delta
    from vlray.lake.tables import TABLES, TableSpec

    rows = before_trial_kinds(build_rows(True))
    assert rows["forced_choice"]
    old = Lake(str(tmp_path / "old"))
    _write_results_without(old, rows, NEW_IN_0_4)
    spec = TABLES["trials"]
    earlier = TableSpec(
        spec.name, spec.path, pa.schema([f for f in spec.schema if f.name != "kind"]), ("dataset",)
    )
    trial = {"trial_id": "t0", "direction": "text_to_image", "query_item_id": "q"}
    trials = trials_table([trial]).drop_columns(["kind"])
    trials = trials.append_column("dataset", pa.array(["shapes"], pa.string()))
    delta.replace_rows(old.storage, earlier, trials, {"dataset": "shapes"})
    before = {name: old.version(name) for name in ("alignment", "trials")}
    scores_before = old.read("alignment").drop_columns(list(NEW_IN_0_4)).sort_by(SCORE_ORDER)

    missing = re.escape(", ".join(NEW_IN_0_4))
    with pytest.raises(LakeError, match=rf"without the columns {missing}; .*lake upgrade"):
        connect(old.uri)

    out = upgrade_cli(old.uri, capsys)
    n = sum(map(len, rows.values()))
    assert f"alignment    {n} score rows: column(s) trial_kind null" in out
    assert f"alignment    {n} score rows: columns null_sd, calibrated, z_score added" in out
    assert "trials       1 rows: column(s) kind added, null" in out
    assert "filled from their" not in out  # the typed parts were there: no label is read
    assert out.rstrip().splitlines()[-1] == f"upgrade: done; {old.uri} is in the current layout"
    assert {name: old.version(name) for name in before} == {k: v + 1 for k, v in before.items()}

    upgraded = old.read("alignment")
    assert upgraded.num_rows == n
    for c in ("trial_kind", "null_sd", "z_score"):
        assert upgraded[c].null_count == n, c
    with_null = [r for r in upgraded.to_pylist() if r["null_mean"] is not None]
    assert with_null  # the layerwise rows have a null mean
    assert_calibrated(upgraded)
    # Every other column as it was.
    assert upgraded.drop_columns(list(NEW_IN_0_4)).sort_by(SCORE_ORDER).equals(scores_before)
    assert_typed_columns(upgraded)
    assert connect(old.uri).execute(
        "SELECT count(*) FROM alignment WHERE calibrated IS NOT NULL"
    ).fetchone() == (len(with_null),)

    read = old.read_table_for("shapes", "trials")
    assert read.schema == TRIALS_SCHEMA and read["kind"].to_pylist() == [None]
    assert read.drop_columns(["kind"]).equals(trials.drop_columns(["dataset"]))
    new_trials = trials_table([{**trial, "trial_id": "t1", "kind": "binding"}])
    old.write_table_for("shapes", "trials", new_trials, "run-test")
    assert old.read_table_for("shapes", "trials")["kind"].to_pylist() == ["binding"]
    assert "nothing to upgrade" in upgrade_cli(old.uri, capsys)


def test_only_missing_null_columns_are_made_and_calibrated_is_value_minus_null_mean():
    table = pa.table(
        {
            "value": [0.5, 0.4, 0.3],
            "null_mean": [0.2, None, float("nan")],
        }
    )
    filled = upgrade_module._with_null_columns(table)
    assert filled.column_names == ["value", "null_mean", "null_sd", "calibrated", "z_score"]
    assert filled["null_sd"].to_pylist() == [None] * 3
    assert filled["calibrated"].to_pylist() == [pytest.approx(0.3), None, None]
    assert filled["z_score"].to_pylist() == [None] * 3
    assert upgrade_module._with_null_columns(filled) is filled
    # A table that lacks only the later parts gets them null; no label is read.
    typed = pa.table(
        {
            "study": ["forced_choice"],
            "metric": ["accuracy"],
            "condition": ["text_to_image"],
            **{
                c: pa.nulls(1, pa.int32() if c in ("top_k", "k") else pa.string())
                for c in METRIC_COLUMNS + CONDITION_COLUMNS
                if c != "trial_kind"
            },
        }
    )
    filled, unknown = upgrade_module._with_typed_columns(typed)
    assert unknown == {} and filled["trial_kind"].to_pylist() == [None]
    assert filled["direction"].to_pylist() == [None]  # kept as it was, not read from the label
