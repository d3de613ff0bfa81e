"""A run killed with SIGKILL at any point leaves the lake valid for SQL, and the next refresh
completes it with every item exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import ray

from vlray.config import validate_config
from vlray.lake import Lake
from vlray.pipeline import run_extract
from vlray.sql import connect, named_query, run_query

from .conftest import small_config

pytestmark = pytest.mark.timeout(600)

MODELS = ["tiny_vit_random", "tiny_gpt2_random"]


def _config_file(tmp_path) -> str:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(small_config(MODELS)))
    return str(path)


def _start(config: str, lake: str) -> subprocess.Popen:
    """`vlray extract` as its own driver on this session's Ray cluster (so a SIGKILL leaves no
    orphaned cluster behind, and Ray cleans up the dead driver's actors)."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(
        [sys.executable, "-m", "vlray.cli", "extract", "--config", config, "--lake", lake],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    # Polled every 10 ms: with the tiny models a model's layer files sit in staging for only
    # about 0.3 s (they are written when its input blocks finish, then committed), and a 0.2 s
    # poll missed that window once in a full `make test`.
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.01)


def _staging_has_layer_files(lake: Lake) -> bool:
    return any("part-L" in f for f in lake.list_files(lake.path("_staging")))


def _manifest_rows(lake: Lake) -> int:
    return lake.manifest().num_rows


@pytest.mark.parametrize(
    "kill_point",
    ["while embeddings are being staged", "after the first partition is committed"],
)
def test_sigkill_then_refresh_gives_every_item_exactly_once(ray_session, tmp_path, kill_point):
    lake_path = str(tmp_path / "lake")
    lake = Lake(lake_path)
    config = _config_file(tmp_path)
    proc = _start(config, lake_path)
    if kill_point == "while embeddings are being staged":
        _wait_for(lambda: _staging_has_layer_files(lake), proc)
    else:
        _wait_for(lambda: _manifest_rows(lake) >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # Valid for SQL right away, and nothing staged is visible.
    con = connect(lake_path)
    visible = run_query(con, "SELECT count(*) AS n FROM embeddings").to_pylist()[0]["n"]
    committed = sum(r["rows"] for r in lake.manifest().to_pylist())
    assert visible >= committed  # a moved-but-unrecorded partition is complete, never partial
    for f in lake.list_files(lake.path("embeddings")):
        assert "_staging" not in f

    # The next run takes over the dead run's lock, clears its staging, completes the work.
    summary = run_extract(validate_config(small_config(MODELS), "t"), lake_path)
    assert not lake.exists(lake.path("_staging"))
    assert not lake.exists(lake.path("_lock"))
    if kill_point == "while embeddings are being staged":
        assert any(not r.skipped for r in summary.results)  # the killed work is redone
    con = connect(lake_path)
    dup = run_query(
        con,
        """
        SELECT count(*) AS n FROM (SELECT model, perturbation, item_id, layer, pooling
        FROM embeddings GROUP BY ALL HAVING count(*) > 1)""",
    ).to_pylist()[0]["n"]
    assert dup == 0
    acc = run_query(con, named_query("accounting")).to_pylist()
    assert acc and all(r["balanced"] for r in acc)
    expected = run_query(con, "SELECT count(*) AS n FROM items").to_pylist()[0]["n"]
    embedded = run_query(
        con,
        "SELECT count(*) AS n FROM (SELECT DISTINCT modality, perturbation,"
        " item_id FROM embeddings)",
    ).to_pylist()[0]["n"]
    assert embedded == expected
    assert (
        sum(r["rows"] for r in Lake(lake_path).manifest().to_pylist())
        == run_query(con, "SELECT count(*) AS n FROM embeddings").to_pylist()[0]["n"]
    )
    shutil.rmtree(lake_path)
