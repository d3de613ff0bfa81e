"""What any reader of a lake may rely on, checked from outside as another node sees it (S3
listings, the Delta log, SQL), and `vlray extract` started as its own driver: shared by the
SIGKILL tests (test_faults) and the concurrent-run tests (test_concurrency)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import ray
import yaml

from vlray.catalog import get_spec
from vlray.items import IMAGE, TEXT
from vlray.lake import Lake
from vlray.sql import connect, named_query, run_query

from .conftest import small_config

MODELS = ["tiny_vit_random", "tiny_gpt2_random"]
# A data file's name: part-<run id>-<write task>-<random>.parquet (vlray.lake.delta.write_file).
_RUN_ID = re.compile(r"/part-(\d{8}T\d{6}-[0-9a-f]{8})-[^/]*\.parquet$")
_PARTITION = re.compile(r"/model=([^/]+)/perturbation=([^/]+)/layer=(\d+)/")


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
      once, each of the model's layers holds every item, and every item of the items table
      is embedded or quarantined;
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
    # Layer by layer too: each of the model's layers holds every item (a layer file left out
    # of a commit would show here even if each item still had as many layers).
    layers: dict[tuple[str, str], set[int]] = {}
    for r in _query(
        con,
        "SELECT model, perturbation, layer, count(DISTINCT item_id) AS items FROM embeddings "
        "GROUP BY ALL",
    ):
        key = (r["model"], r["perturbation"])
        assert r["items"] == records[key]["items"], f"a partial layer: {r}"
        layers.setdefault(key, set()).add(r["layer"])
    for key, seen in layers.items():
        assert seen == set(range(records[key]["layers"])), (key, sorted(seen))
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
