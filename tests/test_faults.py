"""A `vlray extract` killed with SIGKILL leaves an s3:// lake in which every visible partition
is whole and described by the manifest; the next run completes it with every item exactly
once, and `vlray lake vacuum` deletes the files the killed run left unreferenced.

The kill points are observed from outside, as another node sees the lake (S3 listings and
the Delta log), not guessed from timing:

- "written, not committed": the bucket holds a Parquet file under the embeddings table that
  the Delta log does not reference. A model's write tasks put their files in place as its
  batches come out, and one transaction commits them all after the last batch, so this state
  lasts from the first write task to the end of the model's job: seconds even for the tiny
  models (an S3 listing takes a few tens of ms), and every model of the run opens such a
  window again, so a missed one is followed by another. A run that ends without the state
  ever being seen fails the test ("kill point never reached"), and after the kill the test
  checks that unreferenced files really are there, so a lost race cannot pass silently.
- "one model committed": the manifest holds the first model's records and not the second's,
  which lasts a whole model job (tens of seconds).
"""

from __future__ import annotations

import re
import signal
import subprocess

import pyarrow as pa
import pytest

from vlray.cli import main
from vlray.config import validate_config
from vlray.lake import Lake
from vlray.pipeline import run_extract

from .conftest import small_config
from .lakecheck import (
    MODELS,
    assert_complete,
    assert_lake_consistent,
    data_keys,
    referenced_keys,
    run_id_of,
    start_extract,
    uncommitted_keys,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(900)


# --- the test ----------------------------------------------------------------------------------


def _models_in_manifest(lake: str) -> set[str]:
    return set(Lake(lake).manifest()["model"].to_pylist())


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_leaves_whole_partitions_and_the_next_run_completes(
    ray_session, s3_endpoint, s3_lake, tmp_path, capsys
):
    """Two kills on one lake, one after the other (each kill point's run starts from what
    the one before left), then a run to completion and a vacuum."""
    lake = s3_lake
    config = write_config(tmp_path / "run.yaml", MODELS)

    # 1. Killed while its first model's files are written and not committed.
    log = tmp_path / "killed-1.log"
    proc = start_extract(config, lake, log)
    try:
        seen = wait_for(lambda: uncommitted_keys(s3_endpoint, lake), proc, log)
    finally:
        _kill(proc)
    assert assert_lake_consistent(lake) == {}  # nothing committed, nothing visible
    assert seen <= uncommitted_keys(s3_endpoint, lake), "the files seen were committed"
    killed_runs = {run_id_of(k) for k in seen}
    assert len(killed_runs) == 1

    # 2. Killed after its first model's commit: that model whole, the other absent.
    log = tmp_path / "killed-2.log"
    proc = start_extract(config, lake, log)
    try:
        wait_for(lambda: len(_models_in_manifest(lake)) == 1, proc, log)
    finally:
        _kill(proc)
    records = assert_lake_consistent(lake)
    assert {m for m, _ in records} == {MODELS[0]}
    killed_runs |= {r["run_id"] for r in records.values()}

    # The next run redoes exactly the model the killed ones had not committed.
    summary = run_extract(validate_config(small_config(MODELS), "t"), lake)
    assert {r.model for r in summary.results if not r.skipped} == {MODELS[1]}
    assert_complete(lake, MODELS)

    # Vacuum deletes what the killed runs wrote and never committed; the table reads the same.
    orphans = {
        k
        for k in data_keys(s3_endpoint, lake) - referenced_keys(lake)
        if run_id_of(k) in killed_runs
    }
    assert orphans >= seen
    content = _sorted_embeddings(lake)
    capsys.readouterr()
    assert main(["lake", "vacuum", "--lake", lake, "--retain", "0"]) == 0
    printed = capsys.readouterr().out
    deleted = int(re.search(r"vacuum: deleted (\d+) file", printed).group(1))
    assert deleted >= len(orphans), printed
    after = data_keys(s3_endpoint, lake)
    assert not orphans & after
    assert after == referenced_keys(lake)  # nothing unreferenced is left, nothing referenced went
    assert _sorted_embeddings(lake).equals(content)
    assert_complete(lake, MODELS)


def _sorted_embeddings(lake: str) -> pa.Table:
    keys = ["model", "perturbation", "layer", "pooling", "item_id"]
    return Lake(lake).read("embeddings").sort_by([(k, "ascending") for k in keys])
