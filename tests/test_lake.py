"""The lake's commit protocol and its clear errors.

Files become part of a table only through a Delta transaction: written files are invisible
until their commit, a commit that replaces a partition removes the old files in the same
version, older versions stay readable, and a commit overtaken by a concurrent one is retried
against the new version. A lake that cannot be written fails in one line and is left as it
was.
"""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow as pa
import pytest
import yaml
from deltalake import DeltaTable

from vlray.cli import main
from vlray.config import validate_config
from vlray.lake import MANIFEST_SCHEMA, TABLES, Lake, LakeError, delta, manifest_record
from vlray.pipeline import run_extract
from vlray.sql import connect, run_query

from .conftest import lake_files, small_config

EMBEDDINGS = TABLES["embeddings"]


def _rows(prefix: str, n: int) -> pa.Table:
    return pa.table(
        {
            "item_id": [f"{prefix}{i}" for i in range(n)],
            "modality": ["image"] * n,
            "pooling": ["cls"] * n,
            "embedding": [[float(i), 1.0] for i in range(n)],
        }
    )


def _write(lake: Lake, prefix: str, n: int, run: str, model: str = "m", layers: int = 2):
    """A job's files: ``n`` items at each of ``layers`` layers of (d, model, none)."""
    return [
        delta.write_file(
            lake.storage,
            EMBEDDINGS,
            _rows(prefix, n),
            {"dataset": "d", "model": model, "perturbation": "none", "layer": layer},
            run,
        )
        for layer in range(layers)
    ]


def _record(model: str, rows: int, items: int) -> dict:
    return {
        "dataset": "d",
        "model": model,
        "perturbation": "none",
        "rows": rows,
        "items": items,
        "layers": 2,
    }


def _ids(lake: Lake, model: str = "m") -> list[str]:
    return sorted(lake.read("embeddings", {"model": model})["item_id"].to_pylist())


def _sql_count(lake: Lake, model: str = "m") -> int:
    query = f"SELECT count(*) AS n FROM embeddings WHERE model = '{model}'"
    return run_query(connect(lake), query).to_pylist()[0]["n"]


def _log_entry(lake_dir, version: int) -> list[dict]:
    path = lake_dir / "embeddings" / "_delta_log" / f"{version:020d}.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_files_are_invisible_until_committed_and_a_replace_is_one_version(tmp_path):
    lake_dir = tmp_path / "lake"
    lake = Lake(str(lake_dir))

    # Written, not committed: on disk, but no reader sees them (there is no table yet).
    first = _write(lake, "a", 3, "run1")
    assert all((lake_dir / "embeddings" / a.path).exists() for a in first)
    assert lake.read("embeddings").num_rows == 0
    assert _sql_count(lake) == 0

    v1 = lake.commit_embeddings("d", "m", first, [_record("m", 6, 3)], "run1")
    assert _ids(lake) == ["a0", "a0", "a1", "a1", "a2", "a2"]
    assert _sql_count(lake) == 6
    other = lake.commit_embeddings(
        "d", "m2", _write(lake, "o", 2, "run2", "m2"), [_record("m2", 4, 2)], "run2"
    )

    # A second run's files, written beside the first's: still invisible.
    second = _write(lake, "b", 2, "run3")
    assert _ids(lake) == ["a0", "a0", "a1", "a1", "a2", "a2"]
    assert _sql_count(lake) == 6

    # Its commit replaces the partition in one version: the log entry that adds the new files
    # removes the old ones, and no version shows a mix (or nothing).
    v2 = lake.commit_embeddings("d", "m", second, [_record("m", 4, 2)], "run3")
    assert v1 < other < v2
    entry = _log_entry(lake_dir, v2)
    assert {a["add"]["path"] for a in entry if "add" in a} == {a.path for a in second}
    assert {a["remove"]["path"] for a in entry if "remove" in a} == {a.path for a in first}
    assert _ids(lake) == ["b0", "b0", "b1", "b1"]
    assert _sql_count(lake) == 4
    assert _ids(lake, "m2") == ["o0", "o0", "o1", "o1"]  # another model's partition is untouched
    record = lake.partitions("d", "m")["none"]
    assert (record["rows"], record["run_id"], record["embeddings_version"]) == (4, "run3", v2)

    # The old version is still readable, manifest included, until `vacuum`.
    old = Lake(str(lake_dir), as_of=v1)
    assert _ids(old) == ["a0", "a0", "a1", "a1", "a2", "a2"]
    assert _sql_count(old) == 6
    assert old.partitions("d", "m")["none"]["run_id"] == "run1"
    assert all((lake_dir / "embeddings" / a.path).exists() for a in first)


@pytest.mark.parametrize("before", ["empty", "committed"])
def test_a_commit_overtaken_by_a_concurrent_one_is_retried_and_wins_whole(
    tmp_path, monkeypatch, before
):
    """Another writer commits the same partition between this commit's read of the table and
    its own commit: the commit fails, is retried against the new version, and the partition
    holds this commit's files only; also when the partition was empty before (where removing
    what was read would not conflict)."""
    lake = Lake(str(tmp_path / "lake"))
    replace = {"dataset": "d", "model": "m", "perturbation": ["none"]}
    delta.create_if_missing(lake.storage, EMBEDDINGS)
    if before == "committed":
        delta.commit_files(lake.storage, EMBEDDINGS, _write(lake, "a", 3, "old"), replace)
    ours, theirs = _write(lake, "b", 2, "ours"), _write(lake, "c", 4, "theirs")
    real = DeltaTable.create_write_transaction
    calls = []

    def overtaken(self, actions, *args, **kwargs):
        calls.append(len(actions))
        if len(calls) == 1:  # a concurrent writer gets in first
            monkeypatch.setattr(DeltaTable, "create_write_transaction", real)
            delta.commit_files(lake.storage, EMBEDDINGS, theirs, replace)
            monkeypatch.setattr(DeltaTable, "create_write_transaction", overtaken)
        return real(self, actions, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "create_write_transaction", overtaken)
    monkeypatch.setattr(delta.time, "sleep", lambda s: None)
    version = delta.commit_files(lake.storage, EMBEDDINGS, ours, replace)
    assert len(calls) == 2  # overtaken once, then committed
    assert version == lake.version()
    assert _ids(lake) == ["b0", "b0", "b1", "b1"]
    assert _names(lake.table("embeddings").file_uris()) == _names(a.path for a in ours)


def _names(paths) -> set[str]:
    return {os.path.basename(p) for p in paths}


def test_a_commit_returns_its_own_version_and_the_manifest_follows_the_commits(
    tmp_path, monkeypatch
):
    """A commit reports the version it made, even when another writer committed right after
    it; and a partition's manifest record is that of its last commit (whose files are the
    visible ones) even when the runs' records were appended the other way round."""
    import datetime as dt

    lake = Lake(str(tmp_path / "lake"))
    real = DeltaTable.create_write_transaction

    def followed(self, actions, *args, **kwargs):
        real(self, actions, *args, **kwargs)
        monkeypatch.setattr(DeltaTable, "create_write_transaction", real)
        lake.commit_embeddings(
            "d", "m2", _write(lake, "o", 1, "other", "m2"), [_record("m2", 2, 1)], "other"
        )

    monkeypatch.setattr(DeltaTable, "create_write_transaction", followed)
    first = lake.commit_embeddings(
        "d", "m", _write(lake, "a", 3, "run1"), [_record("m", 6, 3)], "run1"
    )
    assert first == lake.version() - 1
    assert lake.partitions("d", "m")["none"]["embeddings_version"] == first

    # Run 1's record is made late (its process stalled after its commit), so it is the newer
    # by created_at; run 2 committed after it and owns the partition.
    late = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    lake.commit_embeddings("d", "m", _write(lake, "b", 2, "run2"), [_record("m", 4, 2)], "run2")
    record = {**_record("m", 6, 3), "created_at": late}
    delta.replace_rows(
        lake.storage,
        TABLES["manifest"],
        pa.Table.from_pylist(
            [manifest_record(**record, embeddings_version=first, run_id="run1")], MANIFEST_SCHEMA
        ),
        None,
    )
    assert lake.partitions("d", "m")["none"]["run_id"] == "run2"
    sql = "SELECT run_id, rows FROM manifest WHERE model = 'm'"
    assert run_query(connect(lake), sql).to_pylist() == [{"run_id": "run2", "rows": 4}]
    assert _sql_count(lake) == 4


def test_a_lake_that_cannot_be_written_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the lake's folder should be")
    lake = Lake(str(blocker / "lake"))
    with pytest.raises(LakeError, match="cannot write .*Not a directory"):
        _write(lake, "a", 1, "run")
    with pytest.raises(LakeError, match="cannot reach the lake .*Not a directory"):
        run_extract(validate_config(small_config(["tiny_vit_random"]), "t"), lake.uri)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config(["tiny_vit_random"])))
    capsys.readouterr()
    assert main(["extract", "--config", str(config), "--lake", lake.uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vlray: error: cannot reach the lake {lake.uri}")
    assert blocker.read_text() == "a file where the lake's folder should be"


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs mounted for the test (needs root, as CI and the dev machine have)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _versions(lake: Lake) -> dict[str, int]:
    return {name: table.version() for name, table in lake.tables().items()}


@pytest.mark.timeout(600)
def test_a_full_disk_is_a_clear_error_and_leaves_the_lake_as_it_was(
    ray_session, small_disk, capsys
):
    """A model's write tasks hit ENOSPC: the run stops with one line naming the model, the file
    and the cause; no table gets a new version (no partition, manifest or quarantine row), and
    what the failed tasks wrote is unreferenced, for `vacuum`; with space again the next run
    completes it with every item once."""
    lake_uri = str(small_disk / "lake")
    run_extract(validate_config(small_config(["tiny_vit_random"]), "t"), lake_uri)
    lake = Lake(lake_uri)
    files_before = lake_files(lake_uri)
    versions_before = _versions(lake)
    manifest_before = lake.manifest()
    embeddings_before = lake.read("embeddings")
    stat = os.statvfs(small_disk)
    ballast = small_disk / "ballast"
    ballast.write_bytes(bytes(stat.f_bavail * stat.f_frsize - 200_000))  # ~200 kB left

    config = small_disk.parent / "run.yaml"
    config.write_text(yaml.safe_dump(small_config(["tiny_vit_random", "efficientnet_lite0"])))
    capsys.readouterr()
    assert main(["extract", "--config", str(config), "--lake", lake_uri]) != 0
    # vlray's own line (Ray's logger prints its traceback beside it).
    ours = [x for x in capsys.readouterr().err.splitlines() if x.startswith("vlray: error:")]
    assert len(ours) == 1, ours
    assert ours[0].startswith("vlray: error: model 'efficientnet_lite0': cannot write"), ours
    assert "No space left on device" in ours[0]
    assert _versions(lake) == versions_before
    assert lake.manifest().equals(manifest_before)
    assert lake.read("embeddings").equals(embeddings_before)
    # Nothing changed but new data files of the failed model, which no table references.
    files_after = lake_files(lake_uri)
    assert {f: files_after[f] for f in files_before} == files_before
    debris = set(files_after) - set(files_before)
    assert all("/embeddings/" in f and "model=efficientnet_lite0" in f for f in debris), debris
    assert not _names(debris) & _names(lake.table("embeddings").file_uris())

    ballast.unlink()
    assert main(["extract", "--config", str(config), "--lake", lake_uri]) == 0
    con = connect(lake)
    counts = run_query(
        con,
        "SELECT layer, count(*) AS n, count(DISTINCT item_id || perturbation) AS items "
        "FROM embeddings WHERE model = 'efficientnet_lite0' GROUP BY layer",
    ).to_pylist()
    assert counts and all(r["n"] == r["items"] for r in counts)
    assert len({r["n"] for r in counts}) == 1
    # `vacuum` deletes the failed run's files; the table reads the same.
    content = lake.read("embeddings")
    assert main(["lake", "vacuum", "--lake", lake_uri, "--retain", "0"]) == 0
    assert not debris & set(lake_files(lake_uri))
    assert lake.read("embeddings").equals(content)


def test_optimize_compacts_small_files_and_vacuum_then_deletes_the_old_ones(tmp_path, capsys):
    """`vlray lake optimize` rewrites a partition's small files as one, in one commit, with
    the same rows; the replaced files stay for --as-of until `vlray lake vacuum` deletes them."""
    from vlray.items import items_table, quarantine_table

    uri = str(tmp_path / "lake")
    lake = Lake(uri)
    rows = [
        {
            "item_id": f"t{i:03d}",
            "modality": "text",
            "text": f"a caption {i}",
            "perturbation": "none",
        }
        for i in range(40)
    ]
    lake.write_items("small", items_table(rows), quarantine_table([]), "run-1", rows_per_file=4)
    files = lambda: len(Lake(uri).table("items").file_uris())  # noqa: E731
    before = lake.read("items").sort_by("item_id")
    version = lake.version("items")
    assert files() == 10

    assert main(["lake", "optimize", "--lake", uri]) == 0
    assert "10 small file(s) compacted into 1" in capsys.readouterr().out
    assert files() == 1 and lake.version("items") == version + 1
    assert lake.read("items").sort_by("item_id").equals(before)
    on_disk = [f for f in lake_files(uri) if "/items/dataset=" in f]
    assert len(on_disk) == 11  # the replaced files are still there for older versions

    assert main(["lake", "vacuum", "--lake", uri, "--retain", "0"]) == 0
    assert "deleted 10 file(s)" in capsys.readouterr().out
    assert [f for f in lake_files(uri) if "/items/dataset=" in f] != on_disk
    assert len([f for f in lake_files(uri) if "/items/dataset=" in f]) == 1
    assert lake.read("items").sort_by("item_id").equals(before)
