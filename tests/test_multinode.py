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

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import yaml

from vlray.catalog import get_spec
from vlray.lake import Lake
from vlray.sql import connect, named_query, run_query

from .conftest import small_config

pytestmark = pytest.mark.timeout(480)

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
MODELS = ["tiny_vit_random", "tiny_gpt2_random"]
# Uploaded with the jobs: the repository less .gitignore'd paths and Ray's default excludes
# (.git, .venv, __pycache__); .devassets is a local folder only .git/info/exclude names.
RUNTIME_ENV = {"excludes": [".devassets"]}
# The entrypoint's wrapper: the run config (VLRAY_RUN_CONFIG, from the job's runtime env) into
# a file in the driver node's own TMPDIR, then the job script with `--config FILE`.
WITH_CONFIG = (
    'cfg=$(mktemp) && printf "%s\\n" "$VLRAY_RUN_CONFIG" > "$cfg" && exec "$@" --config "$cfg"'
)


def _free_ports(n: int) -> list[int]:
    """n distinct ports free right now (held open together, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_range(size: int, taken: list[int]) -> int:
    """The first port of `size` consecutive free ports (a raylet's worker ports), apart from
    the ranges starting at `taken` (those of this cluster's other nodes)."""
    for _ in range(200):
        base = 20_000 + secrets.randbelow(40_000 - size)
        if any(abs(base - t) < size for t in taken):
            continue
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {size} consecutive free ports")


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def _alive(pid: int, start: int) -> bool:
    """Whether the process that started at `start` still runs (not a reused pid)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[1] == start


def _descendants(pid: int) -> dict[int, int]:
    """Every live descendant of pid -> its start time (to tell a reused pid apart)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))):
            children.setdefault(stat[0], []).append((int(entry), stat[1]))
    found, todo = {}, [pid]
    while todo:
        for child, started in children.get(todo.pop(), []):
            found[child] = started
            todo.append(child)
    return found


# Runs `ray start` with SIGTERM as its parent-death signal (Linux), so that a test process
# killed outright leaves no cluster behind: set in the child, then exec (a preexec_fn would run
# Python in a fork of this multi-threaded process).
_PDEATHSIG_EXEC = (
    "import contextlib, ctypes, os, signal, sys\n"
    "with contextlib.suppress(Exception):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


class LocalCluster:
    """A head node and worker nodes, each a `ray start --block` process of this test's, each
    with its own temp dirs; ``env`` (an object store's endpoint and credentials) is the
    environment every node, and so every job and task on it, starts with."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        # A short root: Ray's unix sockets live under it and their paths are limited to 107
        # bytes, which pytest's tmp_path plus Ray's session folder names can exceed. Each node
        # has its own folder under it (ROOT/NAME: Ray's temp dir, ROOT/NAME-tmp: TMPDIR).
        self.root = Path(tempfile.mkdtemp(prefix="vlr", dir="/tmp"))
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)},
            **(env or {}),
            # Token auth with a token of this cluster's own (set explicitly: a node joining
            # with `ray start --address` does not turn it on from ~/.ray/auth_token).
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.nodes: list[subprocess.Popen] = []
        self.names: list[str] = []
        self.gcs = ""
        self.dashboard = ""
        self.killed: list[int] = []
        self._logs: list = []
        self._worker_ports: list[int] = []

    def _start_node(self, name: str, args: list[str]) -> subprocess.Popen:
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = _free_ports(6)
        workers = _free_range(100, self._worker_ports)
        self._worker_ports.append(workers)
        cmd = [
            sys.executable,
            "-c",
            _PDEATHSIG_EXEC,
            RAY,
            "start",
            "--block",
            *args,
            "--num-cpus=1",
            "--num-gpus=0",
            f"--object-store-memory={300 << 20}",
            f"--temp-dir={self.root / name}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--min-worker-port={workers}",
            f"--max-worker-port={workers + 99}",
            "--disable-usage-stats",
            "--include-log-monitor=false",  # job logs come from files; one process less
        ]
        log = open(self.root / f"{name}.log", "w")  # open while the node runs
        self._logs.append(log)
        tmp = self.root / f"{name}-tmp"
        tmp.mkdir()
        node = subprocess.Popen(
            cmd,
            env={**self.env, "TMPDIR": str(tmp)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes.append(node)
        self.names.append(name)
        return node

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def start(self, workers: int = 1) -> None:
        began = time.time()
        gcs, dashboard, client = _free_ports(3)
        self._start_node(
            "head",
            [
                "--head",
                f"--port={gcs}",
                "--include-dashboard=true",  # the job server
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
            ],
        )
        address_file = self.root / "head" / "ray_current_cluster"
        self._wait(address_file.exists, 180)
        self.gcs = address_file.read_text().strip()
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        for i in range(workers):
            self._start_node(f"worker{i}", [f"--address={self.gcs}"])
        self._wait(lambda: len(self.alive_nodes(check=False)) == 1 + workers, 180)
        print(f"\n{1 + workers}-node cluster up in {time.time() - began:.0f}s")

    def _wait(self, condition, timeout: float) -> None:
        deadline = time.time() + timeout
        while not condition():
            for node, name in zip(self.nodes, self.names, strict=True):
                assert node.poll() is None, f"{name} exited:\n{self.log(name)}"
            assert time.time() < deadline, f"cluster not up in {timeout}s:\n{self.log('head')}"
            time.sleep(1)

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def state(self, what: str, *filters: str, check: bool = True) -> list[dict]:
        """`ray list WHAT --detail` through the dashboard (Ray's state API)."""
        args = ["list", what, f"--address={self.dashboard}", "--format=json", "--limit=10000"]
        out = self.ray(*args, "--detail", *(f"--filter={f}" for f in filters))
        if out.returncode != 0:
            assert not check, out.stdout + out.stderr
            return []
        return json.loads(out.stdout)

    def alive_nodes(self, check: bool = True) -> list[dict]:
        return [n for n in self.state("nodes", check=check) if n["state"] == "ALIVE"]

    def submit(
        self,
        submission_id: str,
        *entrypoint: str,
        env_vars: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> str:
        """`ray job submit` (waits for the job and tails its logs); the job's output.
        ``env_vars`` go into the job's runtime env (its driver and every task of it)."""
        runtime_env = {**RUNTIME_ENV, "env_vars": env_vars or {}}
        out = self.ray(
            "job",
            "submit",
            f"--address={self.dashboard}",
            f"--submission-id={submission_id}",
            f"--working-dir={ROOT}",
            f"--runtime-env-json={json.dumps(runtime_env)}",
            "--",
            *entrypoint,
            timeout=timeout,
        )
        text = out.stdout + out.stderr
        assert out.returncode == 0 and f"Job '{submission_id}' succeeded" in text, text[-6000:]
        return text

    def stop(self) -> dict[int, int]:
        """SIGTERM each `ray start --block` (workers first): it stops its node's processes.
        Then SIGKILL whatever of theirs outlived it, by pid and start time. Returns the
        processes that were running (pid -> start time)."""
        started = {}
        for node in self.nodes:
            if stat := _proc_stat(node.pid):
                started[node.pid] = stat[1]
            started.update(_descendants(node.pid))
        for node in reversed(self.nodes):
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p, t) for p, t in started.items()):
            time.sleep(0.5)
        self.killed = [p for p, t in started.items() if _alive(p, t)]
        for pid in self.killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5 if self.killed else 0)
        self.nodes, self.names = [], []
        for log in self._logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        return started


@pytest.fixture
def local_cluster(s3_endpoint):
    cluster = LocalCluster(env=s3_endpoint.env)
    try:
        cluster.start(workers=1)
        yield cluster
    finally:
        cluster.stop()


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
    assert processes and not any(_alive(pid, start) for pid, start in processes.items())
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
