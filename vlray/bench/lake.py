"""``vlray bench lake``: the same extraction and alignment into a lake on the local disk and
into one on an S3 endpoint, side by side in one run.

For each lake: extraction rows per second, seconds per commit (the quarantine merge, the
embeddings transaction and the manifest rows of one (dataset, model) job), data files per
embeddings partition, the layerwise alignment's seconds, and a no-op re-run's seconds (the
log is read, nothing is written). Without ``--s3`` the benchmark starts moto's S3 server on
127.0.0.1 (a development dependency) and stops it at the end.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A world a few times the tests' small one: enough rows for a rate, a minute on 2 cores.
WORLD = {
    "seed": 0,
    "n_scenes": 16,
    "exemplars_per_concept": 8,
    "captions_per_image": 2,
    "sentences_per_concept": 2,
}
MODELS = ("tiny_vit_random", "tiny_gpt2_random")


def bench_lake(uri: str, target: str, models: list[str]) -> dict:
    """Extract, re-run (nothing to do) and align into the lake at ``uri``; one row of figures."""
    from vlray.align import run_align
    from vlray.config import validate_config
    from vlray.lake import Lake
    from vlray.options import AlignOptions
    from vlray.pipeline import run_extract

    config = validate_config(
        {
            "datasets": [{"name": "shapes", "source": "shapes", "params": WORLD}],
            "models": models,
            "extract": {"batch_size": 32},
        },
        "bench lake",
    )
    started = time.time()
    summary = run_extract(config, uri)
    extract_s = time.time() - started
    jobs = [r for r in summary.results if not r.skipped]
    started = time.time()
    again = run_extract(config, uri)
    noop_s = time.time() - started
    if not all(r.skipped for r in again.results):
        raise RuntimeError(f"the re-run into {uri} recomputed something; it should not")
    options = AlignOptions(metrics=("cka",), bootstrap=20, permutations=20, studies=("layerwise",))
    started = time.time()
    run_align(uri, ["shapes"], config.specs(), options)
    align_s = time.time() - started
    lake = Lake(uri)
    files = Counter(
        fragment.path.rsplit("/", 1)[0] for fragment in lake.dataset("embeddings").get_fragments()
    )
    rows = sum(r.rows for r in jobs)
    return {
        "lake": target,
        "rows": rows,
        "extract_s": extract_s,
        "rows_per_s": rows / extract_s,
        "commits": len(jobs),
        "s_per_commit": sum(r.commit_seconds for r in jobs) / max(len(jobs), 1),
        "files_per_partition": sum(files.values()) / max(len(files), 1),
        "noop_rerun_s": noop_s,
        "align_s": align_s,
        "version": lake.version(),
    }


@contextmanager
def local_s3(workdir: Path) -> Iterator[str]:
    """A bucket on a moto server started for the benchmark (AWS_* set while it runs)."""
    from vlray.bench import s3

    with s3.running(workdir) as endpoint:
        yield f"s3://{endpoint.new_bucket('bench')}/lake"


def run(models: list[str] | None = None, s3_uri: str | None = None) -> list[dict]:
    """Both lakes, local first; the ratio of the S3 lake's rate to the local one's last."""
    from vlray.cluster import ensure_ray

    ensure_ray()
    models = list(models or MODELS)
    with tempfile.TemporaryDirectory(prefix="vlray-bench-lake-") as tmp:
        rows = [bench_lake(str(Path(tmp) / "lake"), "local disk", models)]
        if s3_uri:
            rows.append(bench_lake(s3_uri, s3_uri, models))
        else:
            with local_s3(Path(tmp)) as uri:
                rows.append(bench_lake(uri, "S3 (moto on 127.0.0.1)", models))
    rows.append(
        {
            "lake": "S3 / local",
            "rows_per_s": rows[1]["rows_per_s"] / rows[0]["rows_per_s"],
            "s_per_commit": rows[1]["s_per_commit"] / max(rows[0]["s_per_commit"], 1e-9),
            "align_s": rows[1]["align_s"] / rows[0]["align_s"],
        }
    )
    return rows
