"""A real multi-node Ray cluster on this machine, for runs that must cross node boundaries.

One ``ray start --head`` and worker nodes joining it with ``ray start --address``, each a
process of ours with its own temp dirs, ports and CPUs, the whole cluster behind an auth token
of its own. It is what a multi-node deployment looks like to vlray (tasks spread over raylets
with separate object stores, jobs submitted through the dashboard's job server), without the
machines: the multi-node test submits the extraction and alignment jobs to one, and
``vlray bench align`` measures alignment on one. Work reaches it either as ``ray job submit``
(`LocalCluster.submit`) or with this process as its driver (`LocalCluster.driver`).

It is stopped by the process ids it started (SIGTERM to each ``ray start --block``, which
takes its node's processes down with it; then SIGKILL to any of their descendants still
alive, each matched by its start time so that a reused pid is left alone), never with
``ray stop``: that stops every Ray on the machine it can find, the caller's own (a test
session's cluster, a developer's) included.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from unittest import mock

# The `ray` CLI next to this interpreter: the nodes then run the very Ray this process imports,
# as a driver must (a driver and its cluster of different Ray versions refuse each other).
RAY = str(Path(sys.executable).with_name("ray"))

# Runs `ray start` with SIGTERM as its parent-death signal (Linux), so that a process of ours
# killed outright leaves no cluster behind: set in the child, then exec (a preexec_fn would run
# Python in a fork of this multi-threaded process).
_PDEATHSIG_EXEC = (
    "import contextlib, ctypes, os, signal, sys\n"
    "with contextlib.suppress(Exception):\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
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


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for `bind(("", 0))` (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _free_range(size: int, taken: list[int]) -> int:
    """The first port of `size` consecutive free ports (a raylet's worker ports), apart from
    the ranges starting at `taken` (those of this cluster's other nodes).

    Drawn below the kernel's ephemeral range: every other port of a node (ours from
    `_free_ports`, and the ones Ray picks itself) is ephemeral, so none can land inside a
    worker range, which Ray refuses at start-up ("used by other components"). Drawn above
    20000, clear of Ray's fixed defaults (6379, 8265, 10001), which it also checks."""
    top = _ephemeral_low() - size
    if top <= 20_000:
        raise RuntimeError(f"no room for {size} worker ports below the ephemeral range")
    for _ in range(200):
        base = 20_000 + secrets.randbelow(top - 20_000)
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


def alive(pid: int, start: int) -> bool:
    """Whether the process that started at `start` still runs (not a reused pid); `start` as
    in the mapping `LocalCluster.stop` returns."""
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


def _reload_ray_auth() -> None:
    """Make this process's Ray see the auth settings now in os.environ. Ray reads RAY_AUTH_MODE
    into its config, and the token into a loader's cache, once per process; without this a
    process that ran Ray before (or runs it after) would keep the other cluster's settings.
    Private Ray API (what ray.init itself calls when it turns token auth on); a Ray without
    it is left to read the environment on first use, which is all a fresh process needs."""
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import AuthenticationTokenLoader, Config

        # Config first: a core-worker thread still draining that reloads the token must find
        # the new mode, not token mode with no token (a RAY_CHECK failure).
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


class LocalCluster:
    """A head node and worker nodes, each a ``ray start --block`` process of ours with its own
    temp dirs and ``num_cpus`` CPUs (no GPUs).

    ``env`` (an object store's endpoint and credentials, say) is added to the environment
    every node, and so every job and task on it, starts with; `driver` gives it to this
    process too while it drives the cluster. ``working_dir`` and ``runtime_env`` are those of
    every job `submit` sends: the folder uploaded for the job to run in (None: no upload; the
    job runs where the head node was started) and the rest of its runtime env (``excludes``
    for the upload, say). After `start`, ``gcs`` is the cluster's address and ``dashboard``
    its job server's URL.
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        num_cpus: int = 1,
        object_store_memory: int = 300 << 20,
        working_dir: str | Path | None = None,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.working_dir = working_dir
        self.runtime_env = dict(runtime_env or {})
        # A short root: Ray's unix sockets live under it and their paths are limited to 107
        # bytes, which a pytest tmp_path plus Ray's session folder names can exceed. Each node
        # has its own folder under it (ROOT/NAME: Ray's temp dir, ROOT/NAME-tmp: TMPDIR).
        self.root = Path(tempfile.mkdtemp(prefix="vlr", dir="/tmp"))
        # What the nodes get on top of this process's environment (and what `driver` sets in
        # it): the caller's env, and token auth with a token of this cluster's own, set
        # explicitly because a node joining with `ray start --address` does not turn it on
        # from ~/.ray/auth_token.
        self.extra_env = {
            **(env or {}),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        # RAY_ADDRESS left out: `ray` commands run with this env must reach this cluster (their
        # --address), not one the caller's environment points at.
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            **self.extra_env,
        }
        self.nodes: list[subprocess.Popen] = []
        self.names: list[str] = []
        self.gcs = ""
        self.dashboard = ""
        self.killed: list[int] = []
        self._logs: list[IO[str]] = []
        self._worker_ports: list[int] = []

    def _start_node(self, name: str, args: list[str]) -> subprocess.Popen:
        # Every port a node listens on chosen here: Ray's defaults are fixed numbers, which
        # two nodes on one machine (or another Ray on it) would both claim.
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = _free_ports(6)
        workers = _free_range(100, self._worker_ports)
        self._worker_ports.append(workers)
        cmd = [
            sys.executable,
            "-c",
            _PDEATHSIG_EXEC,
            RAY,
            "start",
            "--block",  # the node lives as long as this process of ours: stop() signals it
            *args,
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_memory}",
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
            start_new_session=True,  # a Ctrl-C at the terminal is ours to handle, not theirs
        )
        self.nodes.append(node)
        self.names.append(name)
        return node

    def log(self, name: str) -> str:
        """The tail of node `name`'s ``ray start`` output ("head", "worker0", ...)."""
        path = self.root / f"{name}.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def start(self, workers: int = 1) -> None:
        """Start the head node and `workers` worker nodes; return once all are alive."""
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
        # The head writes its GCS address here once it listens: the moment workers can join.
        address_file = self.root / "head" / "ray_current_cluster"
        self._wait(address_file.exists, 180)
        self.gcs = address_file.read_text().strip()
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        for i in range(workers):
            self._start_node(f"worker{i}", [f"--address={self.gcs}"])
        self._wait(lambda: len(self.alive_nodes(check=False)) == 1 + workers, 180)
        print(f"\n{1 + workers}-node cluster up in {time.time() - began:.0f}s")

    def _wait(self, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.time() + timeout
        while not condition():
            # A node that exited will never make it true: say so now, with its output.
            for node, name in zip(self.nodes, self.names, strict=True):
                if node.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.log(name)}")
            if time.time() >= deadline:
                raise RuntimeError(f"cluster not up in {timeout}s:\n{self.log('head')}")
            time.sleep(1)

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the ``ray`` CLI with `args` in the cluster's environment (its auth token)."""
        return subprocess.run(
            [RAY, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def state(self, what: str, *filters: str, check: bool = True) -> list[dict[str, Any]]:
        """`ray list WHAT --detail` through the dashboard (Ray's state API); with `check`
        False, [] where the command fails (the dashboard not up yet, say)."""
        args = ["list", what, f"--address={self.dashboard}", "--format=json", "--limit=10000"]
        out = self.ray(*args, "--detail", *(f"--filter={f}" for f in filters))
        if out.returncode != 0:
            if check:
                raise RuntimeError(f"ray list {what} failed:\n{out.stdout}{out.stderr}")
            return []
        return json.loads(out.stdout)

    def alive_nodes(self, check: bool = True) -> list[dict[str, Any]]:
        """The state API's records of the cluster's live nodes."""
        return [n for n in self.state("nodes", check=check) if n["state"] == "ALIVE"]

    def submit(
        self,
        submission_id: str,
        *entrypoint: str,
        env_vars: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> str:
        """`ray job submit` (waits for the job and tails its logs); the job's output.
        ``env_vars`` go into the job's runtime env (its driver and every task of it), on top
        of the cluster's ``runtime_env``. Raises RuntimeError when the job fails."""
        base = self.runtime_env
        runtime_env = {**base, "env_vars": {**base.get("env_vars", {}), **(env_vars or {})}}
        working_dir = [] if self.working_dir is None else [f"--working-dir={self.working_dir}"]
        out = self.ray(
            "job",
            "submit",
            f"--address={self.dashboard}",
            f"--submission-id={submission_id}",
            *working_dir,
            f"--runtime-env-json={json.dumps(runtime_env)}",
            "--",
            *entrypoint,
            timeout=timeout,
        )
        text = out.stdout + out.stderr
        if out.returncode != 0 or f"Job '{submission_id}' succeeded" not in text:
            raise RuntimeError(f"job {submission_id} failed:\n{text[-6000:]}")
        return text

    @contextlib.contextmanager
    def driver(self, **init: Any) -> Iterator[Any]:
        """This process as a driver of the cluster: ``ray.init(address=gcs, **init)`` with the
        cluster's environment (its auth token, ``env``) set in os.environ; on exit
        ``ray.shutdown()`` and the environment as it was. Yields ray.init's context. The
        process must not have Ray initialised already (one driver per process)."""
        import ray

        if ray.is_initialized():
            raise RuntimeError("Ray is already initialised in this process")
        try:
            # patch.dict restores the whole environment on exit, whatever was set or removed.
            with mock.patch.dict(os.environ, self.extra_env):
                # RAY_ADDRESS out of the way: ray.init's own address is this cluster's.
                os.environ.pop("RAY_ADDRESS", None)
                _reload_ray_auth()
                try:
                    yield ray.init(address=self.gcs, **init)
                finally:
                    ray.shutdown()
        finally:
            _reload_ray_auth()

    def stop(self) -> dict[int, int]:
        """SIGTERM each `ray start --block` (workers first): it stops its node's processes.
        Then SIGKILL whatever of theirs outlived it, by pid and start time. Returns the
        processes that were running (pid -> start time); ``killed`` lists those SIGKILLed.
        Safe to call again."""
        # Collected before any signal: once a `ray start` exits, its orphans are reparented
        # and no longer found as its descendants.
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
        while time.time() < deadline and any(alive(p, t) for p, t in started.items()):
            time.sleep(0.5)
        self.killed = [p for p, t in started.items() if alive(p, t)]
        for pid in self.killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5 if self.killed else 0)
        self.nodes, self.names = [], []
        for log in self._logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        return started
