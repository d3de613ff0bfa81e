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

The helpers here (``start_extract``, ``assert_lake_consistent``, ...) serve
``test_concurrency`` too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pytest
import ray
import yaml

from vlray.catalog import get_spec
from vlray.cli import main
from vlray.config import validate_config
from vlray.items import IMAGE, TEXT
from vlray.lake import Lake
from vlray.pipeline import run_extract
from vlray.sql import connect, named_query, run_query

from .conftest import small_config

pytestmark = pytest.mark.timeout(900)

MODELS = ["tiny_vit_random", "tiny_gpt2_random"]
# A data file's name: part-<run id>-<write task>-<random>.parquet (vlray.lake.delta.write_file).
_RUN_ID = re.compile(r"/part-(\d{8}T\d{6}-[0-9a-f]{8})-[^/]*\.parquet$")
_PARTITION = re.compile(r"/model=([^/]+)/perturbation=([^/]+)/layer=(\d+)/")


# --- helpers (also used by test_concurrency) ---------------------------------------------------


def write_config(path: Path, models: list[str], **extract) -> str:
    path.write_text(yaml.safe_dump(small_config(models, **extract)))
    return str(path)


def start_extract(config: str, lake: str, log: Path) -> subprocess.Popen:
    """`vlray extract` as its own driver on this session's Ray cluster (so a SIGKILL leaves no
    orphaned cluster behind, and Ray cleans up the dead driver's tasks and actors); its
    output goes to ``log``."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vlray.cli", "extract", "--config", config, "--lake", lake],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def bucket_of(lake: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix)."""
    bucket, _, prefix = lake.removeprefix("s3://").partition("/")
    return bucket, prefix


def data_keys(endpoint, lake: str, table: str = "embeddings") -> set[str]:
    """The bucket's Parquet objects under a table (the Delta log left out)."""
    bucket, prefix = bucket_of(lake)
    return {
        unquote(k)
        for k in endpoint.keys(bucket, f"{prefix}/{table}/")
        if k.endswith(".parquet") and "/_delta_log/" not in k
    }


def referenced_keys(lake: str, table: str = "embeddings") -> set[str]:
    """The objects that the table's latest version is made of, as bucket keys."""
    delta_table = Lake(lake).table(table)
    if delta_table is None:
        return set()
    bucket, _ = bucket_of(lake)
    return {unquote(uri.removeprefix(f"s3://{bucket}/")) for uri in delta_table.file_uris()}


def uncommitted_keys(endpoint, lake: str) -> set[str]:
    """Embeddings files in the bucket that the Delta log does not reference. Listed before the
    log is read: a file committed in between counts as committed, never the other way."""
    keys = data_keys(endpoint, lake)
    return keys - referenced_keys(lake)


def run_id_of(key: str) -> str:
    found = _RUN_ID.search(key)
    assert found, key
    return found.group(1)


def partition_run_ids(lake: str) -> dict[tuple[str, str], set[str]]:
    """(model, perturbation) -> the run ids of the files its visible rows come from."""
    table = Lake(lake).table("embeddings")
    out: dict[tuple[str, str], set[str]] = {}
    for uri in table.file_uris() if table is not None else []:
        model, perturbation, _ = _PARTITION.search(uri).groups()
        out.setdefault((unquote(model), unquote(perturbation)), set()).add(run_id_of(uri))
    return out


def _query(con, sql: str) -> list[dict]:
    return run_query(con, sql).to_pylist()


def assert_lake_consistent(lake: str) -> dict[tuple[str, str], dict]:
    """What any reader may rely on at any moment, even just after a writer was killed:

    - every visible (model, perturbation) partition has exactly the rows its newest manifest
      record says, and a partition without a record has none;
    - each partition is whole: every item has every layer with each of its poolings, exactly
      once, and every item of the items table is embedded or quarantined;
    - a partition's files all come from one run (one job's transaction), the run its manifest
      record names;
    - the items table holds each item once.

    Returns the manifest records by (model, perturbation)."""
    records = {(r["model"], r["perturbation"]): r for r in Lake(lake).manifest().to_pylist()}
    con = connect(lake)
    visible = {
        (r["model"], r["perturbation"]): r["n"]
        for r in _query(
            con, "SELECT model, perturbation, count(*) AS n FROM embeddings GROUP BY ALL"
        )
    }
    for key in visible.keys() | records.keys():
        expected = records[key]["rows"] if key in records else 0
        assert visible.get(key, 0) == expected, (key, visible.get(key, 0), expected)

    per_item = _query(
        con,
        """
        SELECT model, perturbation, item_id, count(*) AS n,
               count(DISTINCT (layer, pooling)) AS pairs,
               count(DISTINCT layer) AS layers, count(DISTINCT pooling) AS poolings
        FROM embeddings GROUP BY ALL""",
    )
    items: dict[tuple[str, str], int] = {}
    for r in per_item:
        key = (r["model"], r["perturbation"])
        assert r["n"] == r["pairs"], f"duplicate rows: {r}"
        assert r["pairs"] == r["layers"] * r["poolings"], f"a layer or pooling missing: {r}"
        assert r["layers"] == records[key]["layers"], f"a layer missing: {r}"
        items[key] = items.get(key, 0) + 1
    for key, n in items.items():
        assert n == records[key]["items"], (key, n, records[key]["items"])
    accounting = _query(con, named_query("accounting"))
    assert all(r["balanced"] for r in accounting), accounting

    for key, runs in partition_run_ids(lake).items():
        assert runs == {records[key]["run_id"]}, f"{key}: files of runs {runs}"
    dup = _query(
        con,
        "SELECT count(*) - count(DISTINCT (dataset, modality, perturbation, item_id)) AS n "
        "FROM items",
    )
    assert dup == [{"n": 0}]
    return records


def assert_complete(lake: str, models: list[str]) -> None:
    """Every model's every perturbation is committed, and the lake is consistent."""
    records = assert_lake_consistent(lake)
    con = connect(lake)
    wanted = {
        (m, r["perturbation"])
        for m in models
        for r in _query(
            con,
            "SELECT DISTINCT perturbation FROM items WHERE modality = "
            f"'{IMAGE if get_spec(m).modality == 'vision' else TEXT}'",
        )
    }
    assert wanted <= records.keys(), wanted - records.keys()
    dup = _query(
        con,
        """
        SELECT count(*) - count(DISTINCT (model, perturbation, item_id, layer, pooling)) AS n
        FROM embeddings""",
    )
    assert dup == [{"n": 0}]


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 600):
    """Poll ``condition`` (an S3 listing or a Delta read: tens of ms each) until it returns
    something true; fail if the run ends first."""
    deadline = time.time() + timeout
    while not (found := condition()):
        assert proc.poll() is None, f"the run ended before the kill point:\n{tail(log)}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.02)
    return found


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
