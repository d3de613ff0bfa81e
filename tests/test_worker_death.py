"""A worker that dies mid-extraction does not fail the job: the embedding actor's process is
SIGKILLed while it computes a batch, Ray restarts the actor and retries its batches (Ray
Data's actor pools default to ``max_restarts=-1`` and ``max_task_retries=-1``), and the run
completes with every item in the lake exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import yaml
from ray._private import state  # the GCS actor table (pid, restarts); needs no dashboard

from vlray.catalog import get_spec
from vlray.sql import connect, named_query, run_query

from .conftest import small_config

pytestmark = pytest.mark.timeout(420)

# Real weights at 224 px and small batches: the actor is busy for several seconds, so it is
# killed in the middle of the work rather than before or after it.
MODEL = "efficientnet_lite0"


def _start(config: str, lake: str, log) -> subprocess.Popen:
    """`vlray extract` as its own driver on this session's Ray cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(
        [sys.executable, "-m", "vlray.cli", "extract", "--config", config, "--lake", lake],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _map_workers() -> dict[str, dict]:
    """Ray Data's pool actors (``_MapWorker``, one embedding model each) by actor id."""
    return {
        actor_id: a for actor_id, a in state.actors().items() if "MapWorker" in a["ActorClassName"]
    }


def _cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while not (found := condition()):
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)
    return found


def _busy_actor(before: set[str]):
    """An embedding actor of this run, alive, and computing (its CPU time grows)."""
    last: dict[int, int] = {}

    def check():
        for actor_id, a in _map_workers().items():
            if actor_id in before or a["State"] != "ALIVE" or not a.get("Pid"):
                continue
            ticks = _cpu_ticks(a["Pid"])
            if ticks is None:
                continue
            # Alive means the model is loaded; then half a CPU-second more is batches.
            start = last.setdefault(a["Pid"], ticks)
            if ticks - start >= os.sysconf("SC_CLK_TCK") // 2:
                return actor_id, a["Pid"]
        return None

    return check


def test_embed_actor_killed_mid_extraction_does_not_fail_the_job(ray_session, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config([MODEL], batch_size=8)))
    lake = str(tmp_path / "lake")
    log_path = tmp_path / "extract.log"
    before = set(_map_workers())
    with open(log_path, "w") as log:
        proc = _start(str(config), lake, log)
        try:
            actor_id, pid = _wait_for(_busy_actor(before), proc, "an embedding actor at work")
            os.kill(pid, signal.SIGKILL)
            killed = time.time()
            assert proc.poll() is None, "the run ended before the kill"
            # Ray restarts the same actor (a new process) rather than failing the job.
            _wait_for(
                lambda: _map_workers()[actor_id]["NumRestarts"] >= 1,
                proc,
                "the killed actor restarted",
                timeout=120,
            )
            rc = proc.wait(timeout=300)
            print(f"\nembedding actor killed; the run ended {time.time() - killed:.0f}s later")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log_path.read_text()
    assert rc == 0, output[-6000:]
    assert "1 model run(s)" in output, output[-6000:]

    # Every image item exactly once per (layer, pooling): the batches the dead actor held
    # were computed again, none twice, none lost.
    con = connect(lake)
    items = run_query(con, "SELECT count(*) AS n FROM items WHERE modality = 'image'").to_pylist()[
        0
    ]["n"]
    per_layer = run_query(
        con,
        "SELECT layer, pooling, count(*) AS rows, count(DISTINCT (item_id, perturbation)) AS n"
        f" FROM embeddings WHERE model = '{MODEL}' GROUP BY ALL",
    ).to_pylist()
    assert len(per_layer) == len(get_spec(MODEL).pooling) * len({r["layer"] for r in per_layer})
    assert all(r["rows"] == r["n"] == items > 0 for r in per_layer), per_layer
    assert run_query(con, "SELECT count(*) AS n FROM quarantine").to_pylist()[0]["n"] == 0
    acc = run_query(con, named_query("accounting")).to_pylist()
    assert acc and all(r["balanced"] for r in acc)
    committed = run_query(con, "SELECT sum(rows) AS n FROM manifest").to_pylist()[0]["n"]
    assert committed == sum(r["rows"] for r in per_layer)
