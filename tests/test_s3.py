"""A lake on object storage, used as a user would: `vlray extract`, `align`, `refresh`,
`report` and `sql` against `s3://` on a real S3 endpoint (moto's server, see tests/s3.py),
the lake's bytes nowhere but in the bucket. Also: a store that is missing or unreachable fails
in one line before any model work, and an endpoint that stops answering mid-run fails the run
in bounded time and leaves the last committed version readable, for a re-run to complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from vlray.catalog import get_spec
from vlray.cli import main
from vlray.lake import Lake
from vlray.sql import connect, named_query, run_query

from . import s3
from .conftest import small_config

pytestmark = pytest.mark.timeout(600)

VISION, LANGUAGE, ADDED = "tiny_vit_random", "tiny_gpt2_random", "minilm_l6_random"
ALIGN = {"metrics": ["cka"], "bootstrap": 0, "permutations": 0, "studies": ["layerwise"]}


def _config(path: Path, models: list[str]) -> str:
    path.write_text(yaml.safe_dump({**small_config(models), "align": ALIGN}))
    return str(path)


def _cli(*argv: str) -> tuple[int, str]:
    """`vlray ARGV` in this process (on the session's Ray): exit status and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(argv))
    return status, out.getvalue()


def _vlray(*argv: str, env: dict[str, str] | None = None, timeout: float = 300):
    """`python -m vlray.cli ARGV` as its own process: exit status, stdout, stderr, seconds."""
    began = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "vlray.cli", *argv],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout, done.stderr, time.time() - began


def _scalar(con, query: str):
    return run_query(con, query).to_pylist()[0]["n"]


def _history_versions(lake: Lake) -> set[int]:
    return {entry["version"] for entry in lake.table("embeddings").history()}


@pytest.fixture(scope="module")
def s3_run(ray_session, s3_endpoint, tmp_path_factory):
    """One lake in its own bucket: `vlray extract` then `vlray align` with the two tiny models."""
    tmp = tmp_path_factory.mktemp("s3run")
    bucket = s3_endpoint.new_bucket()
    uri = f"s3://{bucket}/vl"
    config = _config(tmp / "run.yaml", [VISION, LANGUAGE])
    status, extract_out = _cli("extract", "--config", config, "--lake", uri)
    assert status == 0, extract_out
    status, align_out = _cli("align", "--config", config, "--lake", uri)
    assert status == 0, align_out
    return {
        "uri": uri,
        "bucket": bucket,
        "tmp": tmp,
        "config": config,
        "extract": extract_out,
        "align": align_out,
    }


def test_extract_and_align_write_only_to_the_bucket(s3_run, s3_endpoint):
    uri, bucket = s3_run["uri"], s3_run["bucket"]
    assert "2 model run(s)" in s3_run["extract"]
    assert "align: 1 model pair(s), 9 scores" in s3_run["align"]  # 3 x 3 layers, one metric
    assert not Path(uri).exists() and not Path("s3:").exists()  # nothing written locally

    keys = s3_endpoint.keys(bucket, "vl/")
    for table in ("items", "embeddings", "manifest", "quarantine", "results/alignment"):
        assert f"vl/{table}/_delta_log/00000000000000000000.json" in keys, table
    assert "vl/_vlray_probe" not in keys  # the reachability probe cleans up after itself
    for model in (VISION, LANGUAGE):
        assert any(k.startswith(f"vl/embeddings/dataset=shapes/model={model}/") for k in keys)

    lake = Lake(uri)
    con = connect(uri)
    manifest = lake.manifest().to_pylist()
    for model in (VISION, LANGUAGE):
        spec = get_spec(model)
        records = [r for r in manifest if r["model"] == model]
        rows = _scalar(con, f"SELECT count(*) AS n FROM embeddings WHERE model = '{model}'")
        assert records and rows == sum(r["rows"] for r in records) > 0
        modality = "image" if spec.modality == "vision" else "text"
        items = _scalar(con, f"SELECT count(*) AS n FROM items WHERE modality = '{modality}'")
        assert sum(r["items"] for r in records) == items
        # Every record names the embeddings version that committed it, one in the history.
        assert all(r["embeddings_version"] in _history_versions(lake) for r in records)
    dup = _scalar(
        con,
        "SELECT count(*) AS n FROM (SELECT model, perturbation, item_id, layer, pooling"
        " FROM embeddings GROUP BY ALL HAVING count(*) > 1)",
    )
    assert dup == 0
    acc = run_query(con, named_query("accounting")).to_pylist()
    assert acc and all(r["balanced"] for r in acc)


def test_alignment_rows_record_the_embeddings_version_they_read(s3_run):
    lake = Lake(s3_run["uri"])
    con = connect(lake)
    layers = {
        m: _scalar(con, f"SELECT count(DISTINCT layer) AS n FROM embeddings WHERE model = '{m}'")
        for m in (VISION, LANGUAGE)
    }
    rows = lake.read("alignment").to_pylist()
    assert len(rows) == layers[VISION] * layers[LANGUAGE] == 9
    assert {(r["vision_layer"], r["language_layer"]) for r in rows} == {
        (v, t) for v in range(layers[VISION]) for t in range(layers[LANGUAGE])
    }
    assert all(r["vision_model"] == VISION and r["language_model"] == LANGUAGE for r in rows)
    versions = {r["embeddings_version"] for r in rows}
    assert None not in versions and versions <= _history_versions(lake)
    # Aligned after both models were committed: the version it read holds both.
    assert versions == {lake.version()}
    pinned = Lake(s3_run["uri"], as_of=versions.pop())
    assert {r["model"] for r in pinned.manifest().to_pylist()} == {VISION, LANGUAGE}


def test_sql_command_prints_the_lake_rows(s3_run):
    """`vlray sql` in a fresh process, reaching the bucket through the AWS environment only."""
    uri = s3_run["uri"]
    status, out, err, _ = _vlray(
        "sql",
        "--lake",
        uri,
        "--format",
        "csv",
        "SELECT model, count(*) AS n FROM embeddings GROUP BY model ORDER BY model",
    )
    assert status == 0, err
    printed = {r["model"]: int(r["n"]) for r in csv.DictReader(io.StringIO(out))}
    manifest = Lake(uri).manifest().to_pylist()
    assert printed == {
        m: sum(r["rows"] for r in manifest if r["model"] == m) for m in (VISION, LANGUAGE)
    }
    # A named query, in the default table format (in this process).
    status, out = _cli("sql", "--lake", uri, "--file", "models_overview")
    assert status == 0, out
    assert VISION in out and LANGUAGE in out


def test_report_writes_its_page_from_the_bucket(s3_run, tmp_path):
    out_dir = tmp_path / "report"
    status, out = _cli("report", "--lake", s3_run["uri"], "--out", str(out_dir))
    assert status == 0, out
    index = out_dir / "index.html"
    assert f"report: {index}" in out
    html = index.read_text()
    assert VISION in html and LANGUAGE in html
    assert list(out_dir.rglob("*.png"))


def test_refresh_after_adding_a_model_embeds_only_that_model(s3_run, tmp_path):
    """Last in the module: it changes the shared lake."""
    uri = s3_run["uri"]
    lake = Lake(uri)
    before = lake.version()
    old_rows = {r["model"]: r for r in lake.manifest().to_pylist()}
    config = _config(tmp_path / "added.yaml", [VISION, LANGUAGE, ADDED])
    status, out = _cli("refresh", "--config", config, "--lake", uri)
    assert status == 0, out
    lines = out.splitlines()
    for model in (VISION, LANGUAGE):
        assert any(model in line and "up to date (nothing to do)" in line for line in lines), out
    assert any(ADDED in line and "up to date" not in line for line in lines), out  # embedded
    assert "1 model run(s)" in out
    # The old pair's scores are current; only the new pair is scored.
    assert "results up to date (same inputs)" in out
    assert "align: 2 model pair(s), 21 scores" in out, out  # 3 x 7 layers for the new pair

    lake = Lake(uri)
    manifest = {(r["model"], r["perturbation"]): r for r in lake.manifest().to_pylist()}
    for (model, _), r in manifest.items():
        if model != ADDED:
            assert r["embeddings_version"] <= before  # not recomputed
    con = connect(lake)
    added = [r for (m, _), r in manifest.items() if m == ADDED]
    rows = _scalar(con, f"SELECT count(*) AS n FROM embeddings WHERE model = '{ADDED}'")
    assert added and rows == sum(r["rows"] for r in added) > 0
    assert old_rows.keys() <= {m for m, _ in manifest}

    history = _history_versions(lake)
    alignment = lake.read("alignment").to_pylist()
    by_pair: dict[tuple[str, str], list[dict]] = {}
    for r in alignment:
        by_pair.setdefault((r["vision_model"], r["language_model"]), []).append(r)
    assert set(by_pair) == {(VISION, LANGUAGE), (VISION, ADDED)}
    assert len(by_pair[(VISION, ADDED)]) == 3 * 7
    for pair, rows_of_pair in by_pair.items():
        versions = {r["embeddings_version"] for r in rows_of_pair}
        assert None not in versions and versions <= history, pair
    assert {r["embeddings_version"] for r in by_pair[(VISION, LANGUAGE)]} == {before}
    assert {r["embeddings_version"] for r in by_pair[(VISION, ADDED)]} == {lake.version()}

    # And then nothing is new.
    status, out = _cli("refresh", "--config", config, "--lake", uri)
    assert status == 0 and "nothing new; the lake is up to date" in out, out
    assert Lake(uri).version() == lake.version()


# --- a store that is not there -------------------------------------------------------------


def _assert_one_line_error(status: int, out: str, err: str, seconds: float, uri: str) -> None:
    assert status != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vlray: error: ") and uri in lines[0], lines[0]
    assert "Traceback" not in err and not out.strip()  # no model line: no model work began
    assert seconds < 60, f"took {seconds:.0f}s"


def test_missing_bucket_fails_in_one_line_naming_the_lake(s3_endpoint, tmp_path):
    uri = "s3://no-such-bucket-xyz/vl"
    config = _config(tmp_path / "run.yaml", [VISION, LANGUAGE])
    status, out, err, seconds = _vlray("extract", "--config", config, "--lake", uri)
    _assert_one_line_error(status, out, err, seconds, uri)
    assert "bucket" in err.lower()


def test_unreachable_endpoint_fails_in_one_line_naming_the_lake(s3_endpoint, tmp_path):
    uri = f"s3://{s3_endpoint.new_bucket()}/vl"
    config = _config(tmp_path / "run.yaml", [VISION, LANGUAGE])
    closed = f"http://127.0.0.1:{s3.free_port()}"  # nothing listens there
    status, out, err, seconds = _vlray(
        "extract", "--config", config, "--lake", uri, env={"AWS_ENDPOINT_URL": closed}
    )
    _assert_one_line_error(status, out, err, seconds, uri)


# --- an endpoint that stops answering mid-run ----------------------------------------------

# What each request may wait for a byte, in this test (default 30 s): delta-rs's `timeout` and
# pyarrow's request timeout, each request tried at most 3 times.
STALL = 5


def _collect(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _embeddings(lake: Lake):
    columns = ["model", "perturbation", "layer", "item_id", "pooling", "embedding"]
    rows = lake.read("embeddings", columns=columns)
    return rows.sort_by([(c, "ascending") for c in columns[:-1]])


def test_endpoint_stopped_mid_run_fails_fast_and_keeps_the_last_version(
    ray_session, tmp_path, monkeypatch
):
    """While the second model runs, the store stops answering (SIGSTOP: connections are
    accepted, nothing comes back). The run fails in bounded time, in one line; the version
    committed before reads as it did; once the store answers again a re-run completes."""
    endpoint = s3.start(tmp_path)  # a private endpoint: pausing it disturbs no other test
    proc = None
    try:
        for key, value in endpoint.env.items():
            monkeypatch.setenv(key, value)
        uri = f"s3://{endpoint.new_bucket()}/vl"
        first = _config(tmp_path / "first.yaml", [VISION])
        status, out = _cli("extract", "--config", first, "--lake", uri)
        assert status == 0, out
        lake = Lake(uri)
        version, rows = lake.version(), _embeddings(lake)
        assert version is not None and rows.num_rows > 0

        both = _config(tmp_path / "both.yaml", [VISION, LANGUAGE])
        env = {
            **os.environ,
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "VLRAY_LAKE_TIMEOUT": f"{STALL}s",
            "VLRAY_DATA_PROGRESS": "1",  # Ray Data's "Starting execution": the model job began
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlray.cli", "extract", "--config", both, "--lake", uri],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out_lines: list[str] = []
        err_lines: list[str] = []
        readers = [
            threading.Thread(target=_collect, args=(proc.stdout, out_lines), daemon=True),
            threading.Thread(target=_collect, args=(proc.stderr, err_lines), daemon=True),
        ]
        for reader in readers:
            reader.start()
        deadline = time.time() + 240
        while not any("Starting execution" in line for line in out_lines + err_lines):
            assert proc.poll() is None, "".join(out_lines + err_lines)[-4000:]
            assert time.time() < deadline, "the second model's job never started"
            time.sleep(0.01)
        endpoint.pause()
        paused = time.time()
        try:
            proc.wait(timeout=240)
        finally:
            endpoint.resume()
        seconds = time.time() - paused
        for reader in readers:
            reader.join(timeout=10)
        err = "".join(err_lines)
        # The first model was up to date; the second failed: the run says so in one line.
        assert proc.returncode == 2, err[-4000:]
        last = [line for line in err_lines if line.strip()][-1]
        print(f"\nfailed {seconds:.0f}s after the store stopped answering: {last.strip()}")
        assert last.startswith("vlray: error: ") and uri in last, err[-4000:]
        assert LANGUAGE in last, last
        assert len(last) < 600
        # Bounded by the request timeout: a few tries of STALL seconds each, plus Ray.
        assert seconds < 120, f"{seconds:.0f}s"

        # The last committed version reads as it did, at the latest and pinned alike.
        lake = Lake(uri)
        assert lake.version() == version
        assert _embeddings(lake).equals(rows)
        assert _embeddings(Lake(uri, as_of=version)).equals(rows)
        assert {r["model"] for r in lake.manifest().to_pylist()} == {VISION}

        # A re-run embeds the second model only, and the lake adds up.
        status, out = _cli("extract", "--config", both, "--lake", uri)
        assert status == 0, out
        assert "1 model run(s)" in out and "up to date (nothing to do)" in out, out
        lake = Lake(uri)
        assert lake.version() > version
        con = connect(lake)
        manifest = lake.manifest().to_pylist()
        for model in (VISION, LANGUAGE):
            n = _scalar(con, f"SELECT count(*) AS n FROM embeddings WHERE model = '{model}'")
            assert n == sum(r["rows"] for r in manifest if r["model"] == model) > 0
        acc = run_query(con, named_query("accounting")).to_pylist()
        assert acc and all(r["balanced"] for r in acc)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        endpoint.stop()
