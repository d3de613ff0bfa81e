"""Bring-your-own data through `vlray extract --manifest`: bad rows quarantined, the rest
embedded, and a re-run with one more model computes only that model."""

from __future__ import annotations

import json

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
def user_lake(ray_session, user_dataset, tmp_path_factory):
    manifest, root, _ = user_dataset
    lake = str(tmp_path_factory.mktemp("user") / "lake")
    code = extract_manifest(manifest, root, "tiny_vit_random,tiny_gpt2_random", lake)
    assert code == 0
    return lake


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
    # neighbours need: the studies that lack inputs are skipped with the reason, the layerwise
    # study fails with the metric's reason, and the failure costs the other studies nothing.
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
    assert code == 1, out
    assert "layerwise          FAILED: MetricInputError: " in out, out
    assert "mutual_knn needs at least 11" in out
    for study in ("perturbation", "forced_choice"):
        assert f"{study:<18} skipped: " in out, out
    assert "concept_retrieval  skipped: dataset 'pairs' has no in-context sentences" in out
    assert "1 study run(s) FAILED (the others' results are kept)" in out
    con = connect(user_lake)
    studies = run_query(con, "SELECT DISTINCT study FROM alignment").column("study").to_pylist()
    assert "layerwise" not in studies
    config.write_text(config.read_text().replace("[cka, mutual_knn]", "[cka]"))
    assert main(["align", "--config", str(config), "--lake", user_lake]) == 0
    con = connect(user_lake)  # the views list the results files present when connecting
    studies = run_query(con, "SELECT DISTINCT study FROM alignment").column("study").to_pylist()
    assert "layerwise" in studies


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
