"""Benchmarks that print figures measured side by side in one run (never timed tests).

``vlray bench metrics``: the batched alignment grid against a loop over ``score``.
``vlray bench extract``: model-only rate, vlray's full extraction and a naive loop.
``vlray bench lake``: extraction and alignment into a local lake and an S3 lake.
"""

from vlray.bench.metrics import bench_knn_memory, bench_metrics, synthetic_layers

__all__ = ["bench_knn_memory", "bench_metrics", "synthetic_layers"]
