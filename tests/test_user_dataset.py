"""Bring-your-own data through `vlray extract --manifest`: bad rows quarantined, the rest
embedded, and a re-run with one more model computes only that model."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vlray.cli import main
from vlray.sql import connect, named_query, run_query

from .test_images import encode, noisy, png_claiming

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def user_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    rows = []

    def add(item_id, name, data, caption="a picture of some noise"):
        if data is not None:
            (root / "img" / name).write_bytes(data)
        rows.append(
            {"item_id": item_id, "image": f"img/{name}", "caption": caption, "concept": "noise"}
        )

    for i in range(6):
        add(f"good-{i}", f"good-{i}.png", encode(noisy(seed=i), "PNG"), f"noise number {i}")
    jpeg = encode(noisy(seed=9), "JPEG")
    add("truncated", "truncated.jpg", jpeg[: len(jpeg) // 3])
    add("zero-bytes", "zero.png", b"")
    add("not-an-image", "random.png", np.random.default_rng(0).bytes(500))
    for i in (1, 2):  # the commonest fault, thrice: the summary's top reason
        add(f"not-an-image-{i}", f"random-{i}.png", np.random.default_rng(i).bytes(500))
    add("missing", "missing.png", None)
    add("bomb", "bomb.png", png_claiming(20_000, 20_000))
    add("cmyk", "cmyk.jpg", encode(noisy(seed=3).convert("CMYK"), "JPEG"))
    sixteen = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    add("sixteen-bit", "sixteen.png", encode(sixteen, "PNG"))
    palette = noisy(seed=4).convert("P", palette=Image.ADAPTIVE)
    add("palette-alpha", "palette.png", encode(palette, "PNG", transparency=0))
    add("empty-caption", "empty-caption.png", encode(noisy(seed=5), "PNG"), caption="   ")
    rows.append({"item_id": "escape", "image": "../outside.png", "caption": "escapes the root"})
    rows.append({"item_id": "good-0", "image": "img/good-1.png", "caption": "duplicate id"})
    manifest = root / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest, root, rows


EXPECTED = {  # item_id -> (modality, stage, words in the reason)
    "truncated": ("image", "decode", "truncated"),
    "zero-bytes": ("image", "read", "zero"),
    "not-an-image": ("image", "decode", "cannot identify"),
    "missing": ("image", "read", "missing"),
    "bomb": ("image", "decode", "decompression bomb"),
    "empty-caption": ("text", "validate", "caption"),
    "escape": ("image", "validate", "escapes"),
}


def extract_manifest(manifest, root, models: str, lake) -> int:
    """`vlray extract --manifest ... --root ... --models ... --lake ...`, as a user types it."""
    return main(
        [
            "extract",
            "--manifest",
            str(manifest),
            "--root",
            str(root),
            "--models",
            models,
            "--lake",
            str(lake),
        ]
    )


@pytest.fixture(scope="module")
def user_run(ray_session, user_dataset, tmp_path_factory) -> tuple[str, str]:
    """The lake after one extraction of the manifest, and what that extraction printed."""
    manifest, root, _ = user_dataset
    lake = str(tmp_path_factory.mktemp("user") / "lake")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = extract_manifest(manifest, root, "tiny_vit_random,tiny_gpt2_random", lake)
    assert code == 0, printed.getvalue()
    return lake, printed.getvalue()


@pytest.fixture(scope="module")
def user_lake(user_run) -> str:
    return user_run[0]


def test_extract_names_the_top_quarantine_reasons(user_run, capsys):
    lake, out = user_run
    lines = out.splitlines()
    start = lines.index("quarantine of pairs, top reasons (items):")
    # Items, not rows: an undecodable image is one item, however many models refused it. The
    # reasons are grouped without the paths, ids and byte counts that each row's reason names.
    assert lines[start + 1 : start + 6] == [
        "       3 image/decode: cannot identify image file",
        "       1 image/decode: image too large (possible decompression bomb)",
        "       1 image/decode: truncated JPEG",
        "       1 image/read: missing file",
        "       1 image/read: zero-byte file",
    ], out
    assert lines[start + 6].split() == ["and", "4", "more", "reason(s)"], out
    pointer = lines[start + 7]
    prefix = f"  see them all: vlray sql --lake {lake} "
    assert pointer.startswith(prefix), out
    assert lines[-1].startswith("extract ")  # the closing line stays last
    # The pointer's query runs, and lists every quarantined row of the dataset.
    capsys.readouterr()
    assert main(["sql", "--lake", lake, "--format", "csv", pointer[len(prefix) :].strip('"')]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == "item_id,modality,stage,reason"
    every = run_query(connect(lake), "SELECT count(*) AS n FROM quarantine").to_pylist()[0]["n"]
    assert len(listed) - 1 == every


def test_bad_rows_are_quarantined_with_a_reason(user_lake):
    rows = run_query(connect(user_lake), "SELECT * FROM quarantine").to_pylist()
    by_item = {}
    for r in rows:
        by_item.setdefault((r["item_id"], r["modality"]), []).append(r)
    for item, (modality, stage, words) in EXPECTED.items():
        found = by_item.get((item, modality))
        assert found, f"{item} was not quarantined"
        assert {r["stage"] for r in found} == {stage}, found
        assert all(words in r["reason"].lower() for r in found), found
        assert all("\n" not in r["reason"] for r in found)
    dup = [r for r in rows if r["item_id"] == "good-0"]
    assert dup and all("duplicate" in r["reason"] for r in dup)


def test_odd_modes_are_converted_and_embedded(user_lake):
    got = (
        run_query(
            connect(user_lake),
            """
        SELECT DISTINCT item_id FROM embeddings WHERE model = 'tiny_vit_random'
    """,
        )
        .column("item_id")
        .to_pylist()
    )
    assert {"cmyk", "sixteen-bit", "palette-alpha", "good-0", "good-5", "empty-caption"} <= set(got)
    assert not set(got) & {k for k, v in EXPECTED.items() if v[0] == "image"}


def test_rows_in_equal_rows_written_plus_quarantined(user_lake, user_dataset):
    _, _, manifest_rows = user_dataset
    con = connect(user_lake)
    acc = run_query(con, named_query("accounting")).to_pylist()
    assert {r["model"] for r in acc} == {"tiny_vit_random", "tiny_gpt2_random"}
    assert all(r["balanced"] for r in acc)
    for modality in ("image", "text"):
        items = run_query(
            con, "SELECT count(*) AS n FROM items WHERE modality = $m", {"m": modality}
        ).to_pylist()[0]["n"]
        refused = run_query(
            con,
            "SELECT count(DISTINCT item_id) AS n FROM quarantine "
            "WHERE modality = $m AND model IS NULL",
            {"m": modality},
        ).to_pylist()[0]["n"]
        assert items + refused == len(manifest_rows)


def test_one_more_model_computes_only_that_model(user_lake, user_dataset, capsys):
    manifest, root, _ = user_dataset
    code = extract_manifest(manifest, root, "tiny_vit_random,tiny_gpt2_random,minilm_l6", user_lake)
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("up to date") == 2
    assert "minilm_l6" in out and "1 model run(s)" in out


def test_unknown_model_fails_before_any_work(user_dataset, tmp_path, capsys):
    manifest, root, _ = user_dataset
    lake = tmp_path / "lake"
    code = extract_manifest(manifest, root, "tiny_vit_random,resnet9000", str(lake))
    assert code == 2
    assert "field 'models.1': unknown model 'resnet9000'" in capsys.readouterr().err
    assert not lake.exists()


def test_align_on_a_small_user_dataset_reports_each_study_and_keeps_the_rest(
    user_lake, user_dataset, tmp_path, capsys
):
    # No trials, perturbations or in-context words, and fewer items than mutual_knn's 10
    # neighbours need: the studies that lack inputs are skipped with the reason, mutual_knn is
    # skipped within the layerwise study with its minimum n and the fix, and CKA's scores are
    # written all the same.
    manifest, root, _ = user_dataset
    config = tmp_path / "align.yaml"
    config.write_text(
        f"""
datasets:
  - name: {manifest.stem}
    source: manifest
    params: {{manifest: {manifest}, root: {root}}}
models: [tiny_vit_random, tiny_gpt2_random]
align:
  metrics: [cka, mutual_knn]
  bootstrap: 0
  permutations: 0
"""
    )
    code = main(["align", "--config", str(config), "--lake", user_lake])
    out = capsys.readouterr().out
    assert code == 0, out
    n = int(re.search(r"layerwise +n=(\d+)", out).group(1))
    assert n < 11
    assert (
        f"mutual_knn skipped: needs at least 11 items (k=10 neighbours besides the item "
        f"itself); the dataset has {n}; to score it, set align.metric_kwargs: "
        f"{{mutual_knn: {{k: {n - 1}}}}}, or add items"
    ) in out, out
    assert f"warning: scores from only {n} items, below the documented minimum of 100" in out
    for study in ("perturbation", "forced_choice"):
        assert f"{study:<18} skipped: " in out, out
    assert "concept_retrieval  skipped: dataset 'pairs' has no in-context sentences" in out
    con = connect(user_lake)
    metrics = run_query(
        con, "SELECT DISTINCT metric FROM alignment WHERE study = 'layerwise'"
    ).column("metric")
    assert metrics.to_pylist() == ["cka"]
    log = run_query(
        con, "SELECT metric, status FROM study_log WHERE study = 'layerwise' ORDER BY ALL"
    ).to_pylist()
    assert {"metric": "mutual_knn", "status": "skipped"} in log
    assert {"metric": None, "status": "small_n"} in log
    # A refresh on the same inputs reruns nothing, the skipped studies included.
    from vlray.align import run_align
    from vlray.config import load_config

    loaded = load_config(config)
    (again,) = run_align(user_lake, ["pairs"], loaded.specs(), loaded.align, only_changed=True)
    assert all(s == {"up_to_date": True} for s in again["studies"].values()), again


def test_hub_model_without_its_files_fails_before_any_model_job(
    user_dataset, tmp_path, capsys, monkeypatch
):
    # No network to the hub and an empty hub cache: resnet50's weights cannot be had. The run
    # stops with one line naming the model and the repository, before any model job starts.
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    manifest, root, _ = user_dataset
    lake = tmp_path / "lake"
    code = extract_manifest(manifest, root, "tiny_vit_random,resnet50", str(lake))
    err = capsys.readouterr().err
    assert code == 2
    assert "model 'resnet50' needs 'timm/resnet50.a1_in1k' from the Hugging Face hub" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(lake.glob("embeddings/**/*.parquet"))  # not even tiny_vit_random's
