"""The tests' S3 endpoint: moto's server on 127.0.0.1 (see vlray/bench/s3.py). The suite
starts one for the session (``s3_endpoint`` in conftest); each test that needs a lake gets its
own bucket, so tests share nothing but the server."""

from vlray.bench.s3 import ENV, S3Endpoint, free_port, running, start

__all__ = ["ENV", "S3Endpoint", "free_port", "running", "start"]
