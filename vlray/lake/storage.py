"""Where a lake lives: a local folder or an object store (``s3://``, ``gs://``).

Two clients reach the same bytes: pyarrow's filesystems (Parquet files written by Ray Data
tasks, snapshots read by DuckDB and Ray) and delta-rs (the transaction log). Both take their
endpoint and credentials from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...); what delta-rs needs in
addition is captured here once, so that a task on another node opens the lake the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from vlray.errors import VlrayError, one_line


class LakeError(VlrayError, RuntimeError):
    """A lake that cannot be read or written; the message names the lake and the cause."""


# Environment variables that delta-rs reads for S3-compatible stores; captured at construction
# so that Ray tasks started before they were set still reach the same endpoint.
_S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ALLOW_HTTP",
    "AWS_CONDITIONAL_PUT",
    "AWS_S3_LOCKING_PROVIDER",
    "DELTA_DYNAMO_TABLE_NAME",
    "AWS_S3_ALLOW_UNSAFE_RENAME",
)


def _s3_options(env: dict[str, str]) -> dict[str, str]:
    options = {k: env[k] for k in _S3_ENV if env.get(k)}
    endpoint = options.get("AWS_ENDPOINT_URL_S3") or options.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options.setdefault("AWS_ALLOW_HTTP", "true")
    if "AWS_REGION" not in options:
        options["AWS_REGION"] = options.get("AWS_DEFAULT_REGION", "us-east-1")
    # Commits are made safe by S3's conditional writes (If-None-Match on the log entry), which
    # AWS S3, MinIO, Ceph RGW (Squid and later) and Cloudflare R2 support: no DynamoDB lock.
    # A store without them must set AWS_S3_LOCKING_PROVIDER=dynamodb instead.
    if "AWS_S3_LOCKING_PROVIDER" not in options:
        options.setdefault("AWS_CONDITIONAL_PUT", "etag")
    # An endpoint that stops answering fails a request after VLRAY_LAKE_TIMEOUT (30 s) and
    # three retries, not after the clients' much longer defaults.
    options.setdefault("timeout", os.environ.get("VLRAY_LAKE_TIMEOUT", "30s"))
    options.setdefault("connect_timeout", "5s")
    options.setdefault("max_retries", "3")
    options.setdefault("retry_timeout", "20s")
    return options


@dataclass
class Storage:
    """A lake's root: ``uri`` (absolute path or ``scheme://bucket/prefix``), the pyarrow
    filesystem and root path to reach it, and delta-rs's ``options``."""

    uri: str
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "://" not in self.uri:
            self.uri = os.path.abspath(self.uri)
        elif self.uri.startswith("file://"):
            self.uri = os.path.abspath(self.uri[len("file://") :])
        self.uri = self.uri.rstrip("/")
        if not self.options:
            self.options = _s3_options(dict(os.environ)) if self.scheme == "s3" else {}
        self._fs: pafs.FileSystem | None = None

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0] if "://" in self.uri else "file"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "options": self.options}  # a filesystem does not travel

    def __setstate__(self, state: dict) -> None:
        self.uri, self.options, self._fs = state["uri"], state["options"], None

    @property
    def fs(self) -> pafs.FileSystem:
        """pyarrow's filesystem for the lake (paths are ``self.path(...)``)."""
        if self._fs is None:
            if self.scheme == "s3":
                endpoint = self.options.get("AWS_ENDPOINT_URL", "")
                self._fs = pafs.S3FileSystem(
                    endpoint_override=endpoint.split("://", 1)[-1] or None,
                    scheme="http" if endpoint.startswith("http://") else "https",
                    region=self.options.get("AWS_REGION"),
                    access_key=self.options.get("AWS_ACCESS_KEY_ID"),
                    secret_key=self.options.get("AWS_SECRET_ACCESS_KEY"),
                    session_token=self.options.get("AWS_SESSION_TOKEN"),
                    connect_timeout=5,
                    # The same limit as delta-rs's (VLRAY_LAKE_TIMEOUT): a request that gets
                    # no byte for this long fails (and is retried), instead of hanging.
                    request_timeout=_seconds(self.options.get("timeout", "30s")),
                    retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
                )
            else:
                self._fs = pafs.FileSystem.from_uri(self.uri)[0]
        return self._fs

    @property
    def root(self) -> str:
        return self.uri.split("://", 1)[1] if "://" in self.uri else self.uri

    def path(self, *parts: str) -> str:
        """A path under the lake for pyarrow's filesystem."""
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        """A URI under the lake for delta-rs, DuckDB or Polars."""
        return "/".join([self.uri, *parts])

    def exists(self, *parts: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound
        except OSError as err:
            raise LakeError(f"cannot reach the lake {self.uri}: {_one_line(err)}") from None

    def subtree(self, *parts: str) -> pafs.FileSystem:
        """A filesystem rooted at a table, the form in which delta-rs hands files to pyarrow."""
        return pafs.SubTreeFileSystem(self.path(*parts), self.fs)

    def check_reachable(self, write: bool) -> None:
        """Fail in one line, naming the lake and the cause, if the lake's store cannot be
        reached (no such bucket, bad credentials, endpoint down); ``write`` also checks that
        an object can be written and deleted. Run before any model work."""
        probe = self.path("_vlray_probe")
        try:
            if write:
                if self.is_local:
                    self.fs.create_dir(self.root, recursive=True)
                with self.fs.open_output_stream(probe) as out:
                    out.write(b"ok")
                self.fs.delete_file(probe)
            else:
                self.fs.get_file_info(self.root)
        except OSError as err:
            raise LakeError(f"cannot reach the lake {self.uri}: {_one_line(err)}") from None


def _seconds(duration: str) -> float:
    """A delta-rs duration (``30s``, ``500ms``, ``2m`` or plain seconds) in seconds."""
    text = duration.strip().lower()
    for unit, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def _one_line(err: BaseException) -> str:
    # A store's error can carry a whole response: a lake error keeps its first 300 characters.
    return one_line(err, limit=300)
