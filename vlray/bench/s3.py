"""A real S3-compatible endpoint on this machine: moto's server on 127.0.0.1, on a free port.

The test suite starts one for the session (``s3_endpoint`` in tests/conftest.py) and
``vlray bench lake`` one for its run; both point the standard AWS environment at it and stop
it by its pid. moto is a development dependency (``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ENV = {
    "AWS_ACCESS_KEY_ID": "vlray-test",
    "AWS_SECRET_ACCESS_KEY": "vlray-test-secret",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Endpoint:
    """A running moto server: ``url`` for AWS_ENDPOINT_URL, ``pid`` to stop (or pause) it."""

    url: str
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def env(self) -> dict[str, str]:
        """The environment a client (a `vlray` process, a Ray node) needs to reach it."""
        return {**ENV, "AWS_ENDPOINT_URL": self.url}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, **_boto_credentials())

    def new_bucket(self, prefix: str = "lake") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def pause(self) -> None:
        """The endpoint stops answering (connections hang), as a store that went down."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": ENV["AWS_REGION"],
    }


def start(log_dir: Path) -> S3Endpoint:
    """Start moto's server on a free loopback port and wait until it answers."""
    port = free_port()
    server = Path(sys.executable).with_name("moto_server")
    log = open(log_dir / "moto.log", "wb")  # noqa: SIM115 - the server writes to it until stopped
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **ENV},
    )
    endpoint = S3Endpoint(f"http://127.0.0.1:{port}", process)
    deadline = time.time() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}; see {log.name}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.time() > deadline:
                endpoint.stop()
                raise RuntimeError(f"moto_server did not listen on port {port} in 30 s") from None
            time.sleep(0.1)
    return endpoint


@contextmanager
def running(log_dir: Path) -> Iterator[S3Endpoint]:
    """A started endpoint with the standard AWS environment pointing at it; on exit the
    environment is restored and the server stopped by its pid."""
    endpoint = start(log_dir)
    try:
        # patch.dict restores the environment as it was on exit.
        with mock.patch.dict(os.environ, endpoint.env):
            yield endpoint
    finally:
        endpoint.stop()
