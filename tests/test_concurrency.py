"""`vlray extract` processes on one s3:// lake at the same moment, as nodes would run them:
no lock, every write is a Delta transaction. Different models both land; two runs of the
same model never mix: the partition holds the rows of the run that committed last, whole."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vlray.lake import Lake

from .lakecheck import (
    assert_complete,
    partition_run_ids,
    run_id_of,
    start_extract,
    tail,
    write_config,
)

pytestmark = pytest.mark.timeout(900)

VISION, LANGUAGE = "tiny_vit_random", "tiny_gpt2_random"


def _run_together(runs: list[tuple[str, Path]], lake: str) -> list[str]:
    """Start ``(config, log)`` runs back to back, wait for all; each must exit 0. Returns
    their output."""
    procs = [start_extract(config, lake, log) for config, log in runs]
    try:
        for proc, (_, log) in zip(procs, runs, strict=True):
            assert proc.wait(timeout=780) == 0, tail(log)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [log.read_text(errors="replace") for _, log in runs]


def _run_id(output: str) -> str:
    return re.search(r"^extract (\S+): ", output, re.M).group(1)


def _computed(output: str, model: str) -> bool:
    """Whether the run embedded ``model`` (else its summary says it was up to date)."""
    line = re.search(rf"^\s+shapes\s+{model}\s+(.*)$", output, re.M)
    assert line, output[-3000:]
    # the summary table's row: items, rows, quarantined, seconds, and a note when up to date
    figures = re.fullmatch(r"\d+\s+\d+\s+\d+\s+[\d.]+", line.group(1).strip())
    assert figures or "up to date" in line.group(1), line.group(0)
    return "up to date" not in line.group(1)


def _items_run_ids(lake: str) -> set[str]:
    return {run_id_of(uri) for uri in Lake(lake).table("items").file_uris()}


def test_concurrent_runs_land_whole_and_never_mix(ray_session, s3_lake, tmp_path):
    """Three runs start at once on a fresh lake: one embeds the language model, two embed the
    same vision model. Different models both land. Both vision runs find the partitions
    missing and compute them (a run slowed down past the other's commit finds them done and
    says so); the later commit replaces the earlier one's files in the same transaction, or,
    when it was overtaken between reading the table and committing, retries against the new
    version: the partitions hold one run's rows, whole."""
    vision = write_config(tmp_path / "vision.yaml", [VISION])
    outputs = _run_together(
        [
            (vision, tmp_path / "vision-1.log"),
            (write_config(tmp_path / "language.yaml", [LANGUAGE]), tmp_path / "language.log"),
            (vision, tmp_path / "vision-2.log"),
        ],
        s3_lake,
    )
    run_ids = [_run_id(o) for o in outputs]
    assert _computed(outputs[1], LANGUAGE)
    computed = {
        r
        for r, o in zip(run_ids, outputs, strict=True)
        if o is not outputs[1] and _computed(o, VISION)
    }
    assert computed, outputs

    # Both models whole; no (item, layer, pooling) twice; the items, which every run wrote at
    # once, are one run's, each item once.
    assert_complete(s3_lake, [VISION, LANGUAGE])
    assert len(_items_run_ids(s3_lake)) == 1
    runs = partition_run_ids(s3_lake)
    owners = [r for (m, _), r in runs.items() if m == LANGUAGE]
    assert owners and all(r == {run_ids[1]} for r in owners), owners

    # Every vision run that computed committed once; the last commit's run owns every vision
    # partition, and the newest manifest records are its.
    history = Lake(s3_lake).table("embeddings").history()
    commits = sorted(
        (e["version"], e["vlray.run_id"]) for e in history if e.get("vlray.model") == VISION
    )
    assert sorted(r for _, r in commits) == sorted(computed), commits
    last = commits[-1][1]
    owners = [r for (m, _), r in runs.items() if m == VISION]
    assert owners and all(r == {last} for r in owners), owners
    manifest = Lake(s3_lake).manifest().to_pylist()
    assert {r["run_id"] for r in manifest if r["model"] == VISION} == {last}
