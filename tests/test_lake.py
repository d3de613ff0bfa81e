"""The lake's writer lock and its clear errors: concurrent runs never interleave commits."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pyarrow as pa
import pytest
import yaml

from vlray.cli import main
from vlray.config import validate_config
from vlray.lake import Lake, LakeError
from vlray.pipeline import run_extract
from vlray.sql import connect, run_query

from .conftest import LAKE_MODELS, small_config


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with lake.writer_lock("run-one"):
        with pytest.raises(LakeError, match=r"being written by run run-one \(pid \d+"):
            with lake.writer_lock("run-two"):
                pass
    with lake.writer_lock("run-three"):  # released: the next run gets it
        pass
    assert not lake.exists(lake.path("_lock"))


def test_a_dead_runs_lock_is_taken_over(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    lake.fs.create_dir(lake.root, recursive=True)
    with open(lake.path("_lock"), "w") as f:
        json.dump({"run_id": "killed", "host": socket.gethostname(), "pid": dead.pid}, f)
    with lake.writer_lock("next"):
        assert "next" in open(lake.path("_lock")).read()


@pytest.mark.timeout(300)
def test_extract_into_a_locked_lake_changes_nothing(small_lake, tmp_path):
    source, _ = small_lake
    copy = str(tmp_path / "lake")
    shutil.copytree(source, copy)
    lake = Lake(copy)
    before = sorted(lake.list_files(lake.root))
    with lake.writer_lock("someone-else"):
        with pytest.raises(LakeError, match="someone-else"):
            run_extract(
                validate_config(small_config(LAKE_MODELS + ["minilm_l6_random"]), "t"), copy
            )
    assert sorted(lake.list_files(lake.root)) == before


def test_a_lake_that_cannot_be_written_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the lake's folder should be")
    lake = Lake(str(blocker / "lake"))
    with pytest.raises(LakeError, match="cannot write"):
        lake.write_table(pa.table({"a": [1]}), lake.path("x.parquet"))
    with pytest.raises(LakeError, match="cannot write the lake"):
        run_extract(validate_config(small_config(["tiny_vit_random"]), "t"), lake.uri)
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


@pytest.mark.timeout(600)
def test_a_full_disk_is_a_clear_error_and_leaves_the_lake_as_it_was(
    ray_session, small_disk, capsys
):
    """A model's write tasks hit ENOSPC: the run stops with one line naming the model, the file
    and the cause; no partition, manifest row or staging debris appears; with space again the
    next run completes it with every item once."""
    lake_uri = str(small_disk / "lake")
    run_extract(validate_config(small_config(["tiny_vit_random"]), "t"), lake_uri)
    lake = Lake(lake_uri)
    files_before = sorted(lake.list_files(lake.root))
    manifest_before = lake.manifest()
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
    assert sorted(lake.list_files(lake.root)) == files_before
    assert lake.manifest().equals(manifest_before)

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
