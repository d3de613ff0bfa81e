"""The lake's writer lock and its clear errors: concurrent runs never interleave commits."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess

import pyarrow as pa
import pytest

from vlray.config import validate_config
from vlray.lake import Lake, LakeError
from vlray.pipeline import run_extract

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
