"""A real multi-node Ray cluster on this machine, driven the way a cluster is: `ray start
--head` and a second node joining it with `ray start --address`, one CPU each, then the
extraction and alignment jobs through `ray job submit --working-dir` (the repository is
uploaded and the jobs run in it), and the lake they leave checked with SQL.

The nodes share nothing but the object store: the lake is `s3://` on the session's S3
endpoint (each node reaches it through the AWS environment it was started with), each node
has its own temp dirs (Ray's, and TMPDIR for everything else), and the run config travels with
the job submission (an environment variable of the job's runtime env, written to a node-local
file by the entrypoint), not through a shared path.

The cluster is this test's own: its own ports, temp dirs and auth token. It is stopped by the
process ids it started (SIGTERM to each `ray start --block`, which takes its node's processes
down with it; then SIGKILL to any of their descendants still alive), never with `ray stop`,
which would also stop the test session's cluster and any other Ray on the machine.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from vlray.bench.localcluster import LocalCluster, alive
from vlray.catalog import get_spec
from vlray.lake import Lake
from vlray.sql import connect, named_query, run_query

from .conftest import small_config

pytestmark = pytest.mark.timeout(480)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["tiny_vit_random", "tiny_gpt2_random"]
# Uploaded with the jobs: the repository less .gitignore'd paths and Ray's default excludes
# (.git, .venv, __pycache__); .devassets is a local folder only .git/info/exclude names.
RUNTIME_ENV = {"excludes": [".devassets"]}
# The entrypoint's wrapper: the run config (VLRAY_RUN_CONFIG, from the job's runtime env) into
# a file in the driver node's own TMPDIR, then the job script with `--config FILE`.
WITH_CONFIG = (
    'cfg=$(mktemp) && printf "%s\\n" "$VLRAY_RUN_CONFIG" > "$cfg" && exec "$@" --config "$cfg"'
)


@pytest.fixture
def local_cluster(s3_endpoint):
    cluster = LocalCluster(env=s3_endpoint.env, working_dir=ROOT, runtime_env=RUNTIME_ENV)
    try:
        cluster.start(workers=1)
        yield cluster
    finally:
        cluster.stop()


def test_worker_port_ranges_stay_clear_of_every_port_ray_or_we_pick():
    # CI once failed because a node's agent port (ephemeral) fell inside its worker range.
    from vlray.bench.localcluster import _ephemeral_low, _free_ports, _free_range

    taken: list[int] = []
    for _ in range(20):
        taken.append(_free_range(100, taken))
    assert all(20_000 <= base and base + 100 <= _ephemeral_low() for base in taken)
    assert all(abs(a - b) >= 100 for i, a in enumerate(taken) for b in taken[:i])
    assert all(p >= _ephemeral_low() for p in _free_ports(50))


def _scalar(con, query: str):
    return run_query(con, query).to_pylist()[0]["n"]


def _lake_paths(root: Path) -> list[str]:
    """Anything of a lake under the nodes' folders (a Delta log, an embeddings partition),
    less the copies of the repository the jobs ran in (its test data has a lake)."""
    return [
        str(p)
        for p in root.rglob("*")
        if (p.name == "_delta_log" or p.name.startswith(("model=", "layer=")))
        and "runtime_resources" not in p.parts
    ]


def test_jobs_submitted_to_a_two_node_cluster(ray_session, s3_endpoint, local_cluster):
    started = time.time()
    cluster = local_cluster
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2 and sum(n["resources_total"]["CPU"] for n in nodes) == 2
    config = yaml.safe_dump(
        {
            **small_config(MODELS),
            "align": {"metrics": ["cka"], "bootstrap": 0, "permutations": 0},
        }
    )
    bucket = s3_endpoint.new_bucket()
    lake = f"s3://{bucket}/vl"
    env_vars = {"VLRAY_RUN_CONFIG": config}

    # The venv's interpreter, named: `make test` runs pytest through .venv/bin/python without
    # activating the venv, so a bare `python` on the job's PATH would lack vlray's packages.
    job = ["sh", "-c", WITH_CONFIG, "sh", sys.executable]
    out = cluster.submit(
        "vlray-extract", *job, "pipelines/extract.py", "--lake", lake, env_vars=env_vars
    )
    assert "2 model run(s)" in out
    print(f"extraction job: {time.time() - started:.0f}s")
    # Ray Data spread the extraction's tasks over both nodes.
    jobs = cluster.state("jobs", "submission_id=vlray-extract")
    tasks = cluster.state("tasks", f"job_id={jobs[0]['job_id']}")
    assert {t["node_id"] for t in tasks if t.get("node_id")} == {n["node_id"] for n in nodes}

    began = time.time()
    out = cluster.submit(
        "vlray-align", *job, "pipelines/align.py", "--lake", lake, env_vars=env_vars
    )
    assert "align: 1 model pair(s)" in out
    print(f"alignment job: {time.time() - began:.0f}s")

    # The lake is in the bucket, and nowhere on the nodes.
    keys = s3_endpoint.keys(bucket, "vl/")
    for table in ("items", "embeddings", "manifest", "results/alignment"):
        assert f"vl/{table}/_delta_log/00000000000000000000.json" in keys, table
    for name in MODELS:
        assert any(k.startswith(f"vl/embeddings/dataset=shapes/model={name}/") for k in keys)
    assert not _lake_paths(cluster.root)
    # The run config reached each job's driver in its node's own TMPDIR, from the submission.
    configs = [f for f in cluster.root.glob("*-tmp/tmp.*") if f.read_text() == config + "\n"]
    assert len(configs) == 2, sorted(cluster.root.glob("*-tmp/*"))

    con = connect(lake)
    dup = _scalar(
        con,
        "SELECT count(*) AS n FROM (SELECT model, perturbation, item_id, layer, pooling"
        " FROM embeddings GROUP BY ALL HAVING count(*) > 1)",
    )
    assert dup == 0
    for name in MODELS:
        spec = get_spec(name)
        modality = "image" if spec.modality == "vision" else "text"
        items = _scalar(con, f"SELECT count(*) AS n FROM items WHERE modality = '{modality}'")
        # Every item of the modality at every layer of the model.
        per_layer = run_query(
            con,
            "SELECT layer, count(DISTINCT (item_id, perturbation)) AS n, count(*) AS rows"
            f" FROM embeddings WHERE model = '{name}' GROUP BY layer",
        ).to_pylist()
        assert len(per_layer) > 1 and all(r["n"] == items > 0 for r in per_layer), per_layer
        # One manifest row per (model, perturbation) partition, its rows those in the lake.
        manifest = run_query(
            con, f"SELECT perturbation, rows FROM manifest WHERE model = '{name}'"
        ).to_pylist()
        perturbations = _scalar(
            con,
            f"SELECT count(DISTINCT perturbation) AS n FROM items WHERE modality = '{modality}'",
        )
        assert len(manifest) == perturbations
        assert sum(r["rows"] for r in manifest) == sum(r["rows"] for r in per_layer)
    acc = run_query(con, named_query("accounting")).to_pylist()
    assert acc and all(r["balanced"] for r in acc)
    # The alignment job scored every (vision layer, language layer) pair.
    layers = {
        name: _scalar(
            con, f"SELECT count(DISTINCT layer) AS n FROM embeddings WHERE model = '{name}'"
        )
        for name in MODELS
    }
    scores = run_query(
        con,
        "SELECT vision_layer, language_layer, value FROM alignment"
        " WHERE study = 'layerwise' AND metric = 'cka'",
    ).to_pylist()
    assert len(scores) == layers[MODELS[0]] * layers[MODELS[1]]
    assert len({(r["vision_layer"], r["language_layer"]) for r in scores}) == len(scores)
    assert all(0 <= r["value"] <= 1 + 1e-6 for r in scores)
    # Each score records the embeddings table version it read: the one both models are in.
    store = Lake(lake)
    history = {e["version"] for e in store.table("embeddings").history()}
    read = set(
        store.read("alignment", columns=["embeddings_version"])["embeddings_version"].to_pylist()
    )
    assert read == {store.version()} and read <= history

    # Stopped by its own process ids: every process it started is gone, and the test
    # session's cluster still runs tasks.
    began = time.time()
    processes = cluster.stop()
    print(f"stopped in {time.time() - began:.0f}s; SIGKILLed after SIGTERM: {cluster.killed}")
    assert processes and not any(alive(pid, start) for pid, start in processes.items())
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
