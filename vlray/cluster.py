"""Joining or starting Ray, the same way for every job."""

from __future__ import annotations

import logging
import os

import ray

# Ray's start-up notices that say nothing about the run, by logger and the start of their
# message. Only these records are dropped: the same loggers' other warnings still show (the
# token-auth module's "Token authentication is disabled ..." is a real security warning).
KNOWN_NOISE = {
    # A local cluster turns token authentication on by itself (the secure default, which we
    # keep) and says so on every run.
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray cluster",
    ),
}


class _DropKnownNoise(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_ray_logs() -> None:
    """Attach the known-noise filters to Ray's loggers (once; calling again changes nothing)."""
    for name, starts in KNOWN_NOISE.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in target.filters):
            target.addFilter(_DropKnownNoise(starts))


def _cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's cpuset narrows it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def ensure_ray() -> None:
    """Join the cluster in RAY_ADDRESS (ray submit / job submit) or start a local one."""
    if not os.environ.get("VLRAY_DATA_PROGRESS"):
        # Ray Data logs at INFO each job's plan as it starts, where its logs are, a notice about
        # its new progress UI, and off a terminal a dozen progress lines per operator every few
        # seconds: they bury vlray's own summary. Its warnings still show, and on a terminal so
        # do its progress bars (tqdm, not logging); VLRAY_DATA_PROGRESS=1 keeps it all.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    quiet_ray_logs()
    # Read and write tasks ask for a quarter of a CPU (ExtractOptions.io_cpus), so that they
    # always find a slot beside the embedding actor: a run is expected to start four worker
    # processes per CPU. Ray expects one, and past four times that (plus 8 for IO workers) its
    # raylet prints "N PYTHON worker processes have been started ... 4x the maximum expected
    # startup concurrency" to the driver's stdout, amid vlray's summary. The raylet also lets
    # that many workers start at once (it starts them anyway, as the tasks ask for them). Read
    # by the raylet that ray.init starts (a cluster that vlray joins keeps its own setting);
    # a value set by the user wins.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(4 * _cpus()))
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            log_to_driver=False,
            logging_level=logging.WARNING,
            # The dashboard's API server is several seconds of a local start-up, and vlray
            # reports progress itself; VLRAY_DASHBOARD=1 starts it (http://127.0.0.1:8265).
            include_dashboard=bool(os.environ.get("VLRAY_DASHBOARD")),
        )
