"""Loaders of real dataset formats (COCO captions, Pick-a-Pic, image folders, Parquet,
WebDataset), each on a small fixture built here in the real format; the extra tables
(trials, concepts) in the lake and their views; one extraction end to end."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlray.items import CONCEPTS_SCHEMA, TRIALS_SCHEMA, trials_table
from vlray.lake import Lake
from vlray.sources import SOURCES, SourceError, SourceOutput, check_params, load_source
from vlray.sql import connect, run_query

from .test_images import encode, noisy


def jpeg(seed: int) -> bytes:
    return encode(noisy(seed=seed), "JPEG")


def png(seed: int) -> bytes:
    return encode(noisy(seed=seed), "PNG")


def uid_jpeg(uid: str) -> bytes:
    """A JPEG that depends on the image uid only (``hash`` varies between processes)."""
    return jpeg(sum(map(ord, uid)))


def by_id(table: pa.Table, modality: str | None = None) -> dict[str, dict]:
    return {
        r["item_id"]: r for r in table.to_pylist() if modality is None or r["modality"] == modality
    }


def refused(out: SourceOutput) -> dict[tuple[str | None, str | None], dict]:
    return {(r["item_id"], r["modality"]): r for r in out.quarantine.to_pylist()}


# --------------------------------------------------------------------------- COCO


def coco_fixture(tmp_path) -> tuple[str, str]:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for image_id in (139, 285):
        (root / "val2017" / f"{image_id:012d}.jpg").write_bytes(jpeg(image_id))
    (tmp_path / "outside.jpg").write_bytes(jpeg(0))
    doc = {
        "info": {"description": "tiny COCO"},
        "images": [
            {"id": 139, "file_name": "000000000139.jpg", "width": 64, "height": 48},
            {"id": 285, "file_name": "000000000285.jpg", "width": 64, "height": 48},
            {"id": 632, "file_name": "000000000632.jpg", "width": 64, "height": 48},  # absent
            {"id": 724, "file_name": "../outside.jpg", "width": 64, "height": 48},
            {"id": 139, "file_name": "000000000139.jpg"},  # duplicate id
            {"file_name": "no-id.jpg"},
        ],
        "annotations": [
            {"image_id": 139, "id": 10, "caption": "A woman in a kitchen. "},
            {"image_id": 139, "id": 11, "caption": "Someone cooking dinner."},
            {"image_id": 285, "id": 20, "caption": "A big brown bear."},
            {"image_id": 632, "id": 30, "caption": "A bedroom with a bookshelf."},
            {"image_id": 285, "id": 21, "caption": "   "},
            {"image_id": 999, "id": 40, "caption": "An image nobody listed."},
            {"image_id": 285, "id": 20, "caption": "Duplicate annotation id."},
        ],
    }
    captions = root / "annotations" / "captions_val2017.json"
    captions.write_text(json.dumps(doc))
    return str(captions), str(root / "val2017")


def test_coco_items_pairs_and_quarantine(tmp_path):
    captions, root = coco_fixture(tmp_path)
    out = load_source("coco", "coco", {"captions": captions, "root": root})
    assert out.tables == {}
    images, texts = by_id(out.items, "image"), by_id(out.items, "text")
    assert set(images) == {"139", "285"}
    assert images["139"]["role"] == "scene" and images["139"]["split"] == "val"
    assert images["139"]["image_path"] == os.path.join(os.path.realpath(root), "000000000139.jpg")
    assert set(texts) == {"139#c10", "139#c11", "285#c20", "632#c30"}
    assert texts["139#c10"]["text"] == "A woman in a kitchen."
    assert texts["139#c10"]["pair_id"] == "139" and texts["139#c10"]["role"] == "caption"
    assert texts["632#c30"]["pair_id"] == "632"  # its image is missing; the caption still loads

    bad = refused(out)
    missing = bad[("632", "image")]
    assert missing["stage"] == "read" and "000000000632.jpg" in missing["reason"]
    assert missing["source"].endswith("captions_val2017.json:images[2]")
    assert bad[("724", "image")]["stage"] == "validate"
    assert "escapes" in bad[("724", "image")]["reason"]
    assert "duplicate image id 139" in bad[("139", "image")]["reason"]
    assert "id" in bad[("images[5]", "image")]["reason"]
    assert "empty caption" in bad[("285#c21", "text")]["reason"]
    assert "image_id 999" in bad[("annotations[5]", "text")]["reason"]
    assert "duplicate annotation id 20" in bad[("285#c20", "text")]["reason"]
    assert {r["stage"] for k, r in bad.items() if k != ("632", "image")} == {"validate"}
    # Every entry of the file is an item or a quarantine row.
    assert out.items.num_rows + out.quarantine.num_rows == 6 + 7


def test_coco_limit_split_and_annotations_without_ids(tmp_path):
    captions, root = coco_fixture(tmp_path)
    doc = json.loads(open(captions).read())
    for ann in doc["annotations"]:
        ann.pop("id")
    plain = tmp_path / "captions.json"
    plain.write_text(json.dumps(doc))
    out = load_source("coco", "c", {"captions": str(plain), "root": root, "limit": 1})
    assert set(by_id(out.items, "image")) == {"139"}
    texts = by_id(out.items, "text")
    assert set(texts) == {"139#k0", "139#k1"}
    assert {r["split"] for r in out.items.to_pylist()} == {"train"}
    out = load_source("coco", "c", {"captions": captions, "root": root, "split": "test"})
    assert {r["split"] for r in out.items.to_pylist()} == {"test"}


def test_coco_whole_file_errors_name_the_file(tmp_path):
    captions, root = coco_fixture(tmp_path)
    with pytest.raises(SourceError, match="nowhere.json"):
        load_source("coco", "c", {"captions": str(tmp_path / "nowhere.json"), "root": root})
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(SourceError, match="broken.json as JSON"):
        load_source("coco", "c", {"captions": str(broken), "root": root})
    no_annotations = tmp_path / "captions_x.json"
    no_annotations.write_text('{"images": []}')
    with pytest.raises(SourceError, match="no list 'annotations'"):
        load_source("coco", "c", {"captions": str(no_annotations), "root": root})
    with pytest.raises(SourceError, match="is not a folder"):
        load_source("coco", "c", {"captions": captions, "root": str(tmp_path / "no-images")})
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_source("coco", "c", {"captions": captions, "root": root, "limit": 0})
    assert "missing parameter 'root'" in check_params("coco", {"captions": captions})
    assert "unknown parameter 'images'" in check_params("coco", {"images": 1, "root": root})


# --------------------------------------------------------------------------- Pick-a-Pic


def pickapic_row(ranking_id, caption, uid0, uid1, label0, label1, jpg0=..., jpg1=...) -> dict:
    return {
        "are_different": True,
        "best_image_uid": uid0,
        "caption": caption,
        "created_at": "2023-04-01 12:00:00",
        "has_label": True,
        "image_0_uid": uid0,
        "image_0_url": f"https://example.invalid/{uid0}.png",
        "image_1_uid": uid1,
        "image_1_url": f"https://example.invalid/{uid1}.png",
        "jpg_0": uid_jpeg(uid0) if jpg0 is ... else jpg0,
        "jpg_1": uid_jpeg(uid1) if jpg1 is ... else jpg1,
        "label_0": label0,
        "label_1": label1,
        "model_0": "sd-xl",
        "model_1": "sd-2.1",
        "ranking_id": ranking_id,
        "user_id": 7,
        "num_example_per_prompt": 1,
    }


def pickapic_fixture(path) -> str:
    rows = [
        pickapic_row(1, "a corgi astronaut", "u-a", "u-b", 1.0, 0.0),
        pickapic_row(2, "a red bicycle in snow", "u-c", "u-d", 0.0, 1.0),
        pickapic_row(3, "a castle made of cheese", "u-e", "u-f", 0.5, 0.5),  # a tie
        pickapic_row(4, "a corgi astronaut", "u-a", "u-g", 0.0, 1.0),  # caption and u-a again
        pickapic_row(5, "a lighthouse at dusk", "u-h", "u-i", 1.0, 0.0, jpg1=None),
        pickapic_row(6, "", "u-j", "u-k", 1.0, 0.0),
        pickapic_row(7, "a teapot", "u-l", "u-m", None, None),
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_pickapic_items_and_trials(tmp_path):
    path = pickapic_fixture(tmp_path / "train-00000-of-00001.parquet")
    out = load_source("pickapic", "pap", {"path": path})
    texts, images = by_id(out.items, "text"), by_id(out.items, "image")
    assert len(texts) == 5  # distinct non-empty captions
    corgi = [t for t in texts.values() if t["text"] == "a corgi astronaut"]
    assert len(corgi) == 1
    corgi_id = corgi[0]["item_id"]
    assert set(images) == {f"u-{c}" for c in "abcdefghjklm"}  # u-i has no bytes
    assert images["u-a"]["image"] == uid_jpeg("u-a")
    assert images["u-a"]["pair_id"] == corgi_id and images["u-a"]["role"] == "scene"
    assert {r["split"] for r in out.items.to_pylist()} == {"train"}

    trials = {t["trial_id"]: t for t in out.tables["trials"].to_pylist()}
    assert out.tables["trials"].schema == TRIALS_SCHEMA
    forward = {k: t for k, t in trials.items() if t["direction"] == "text_to_image"}
    assert set(forward) == {"1", "2", "3", "4"}
    assert trials["1"]["preferred"] == 0 and trials["2"]["preferred"] == 1
    assert trials["3"]["preferred"] is None and trials["3"]["label"] == [0.5, 0.5]
    assert trials["4"]["query_item_id"] == corgi_id
    assert trials["4"]["choice_item_ids"] == ["u-a", "u-g"]
    # Derived image-to-text trials: one per ranking that is not a tie.
    assert set(trials) - set(forward) == {f"{k}/image_to_text" for k in ("1", "2", "4")}
    for key in ("1", "2", "4"):
        t, back = trials[key], trials[f"{key}/image_to_text"]
        assert back["direction"] == "image_to_text"
        assert back["query_item_id"] == t["choice_item_ids"][t["preferred"]]  # the chosen image
        own, other = back["choice_item_ids"][back["preferred"]], back["choice_item_ids"]
        assert own == t["query_item_id"] and len(set(other)) == 2 and set(other) <= set(texts)
        assert back["label"][back["preferred"]] == 1.0 and sorted(back["label"]) == [0.0, 1.0]
        assert (back["split"], back["source"]) == (t["split"], t["source"])

    bad = refused(out)
    assert bad[("u-i", "image")]["stage"] == "validate"
    assert "ranking_id 5" in bad[("u-i", "image")]["reason"]
    assert "'jpg_1'" in bad[("u-i", "image")]["reason"]
    caption = bad[("ranking_id 6/caption", "text")]
    assert "ranking_id 6" in caption["reason"] and "'caption'" in caption["reason"]
    labels = bad[("7", None)]
    assert "label_0" in labels["reason"] and labels["source"].endswith(":row 7")


def _image_to_text(path: str, seed: int) -> list[tuple]:
    out = load_source("pickapic", "pap", {"path": path, "image_to_text_seed": seed})
    return [
        (t["trial_id"], tuple(t["choice_item_ids"]), t["preferred"])
        for t in out.tables["trials"].to_pylist()
        if t["direction"] == "image_to_text"
    ]


def test_pickapic_image_to_text_trials_are_seeded(tmp_path):
    path = pickapic_fixture(tmp_path / "train-00000-of-00001.parquet")
    assert _image_to_text(path, 0) == _image_to_text(path, 0)
    draws = [_image_to_text(path, seed) for seed in range(12)]
    # Over seeds, the true caption stands first and second, and ranking 1 (corgi) meets both
    # other captions (the bicycle and the castle): the draws are random, not fixed.
    assert {p for d in draws for _, _, p in d} == {0, 1}
    assert len({frozenset(c) for d in draws for k, c, _ in d if k == "1/image_to_text"}) == 2
    with pytest.raises(ValueError, match="image_to_text_seed"):
        load_source("pickapic", "pap", {"path": path, "image_to_text_seed": -1})

    one = [pickapic_row(k, "a teapot", f"t-{k}a", f"t-{k}b", 1.0, 0.0) for k in (1, 2)]
    pq.write_table(pa.Table.from_pylist(one), tmp_path / "one.parquet")
    trials = load_source("pickapic", "pap", {"path": str(tmp_path / "one.parquet")})
    assert trials.tables["trials"]["direction"].to_pylist() == ["text_to_image"] * 2


def test_pickapic_shards_split_limit_and_missing_column(tmp_path):
    folder = tmp_path / "pickapic"
    folder.mkdir()
    pickapic_fixture(folder / "validation_unique-00000-of-00001.parquet")
    out = load_source("pickapic", "pap", {"path": str(folder), "limit": 2})
    assert {t["trial_id"] for t in out.tables["trials"].to_pylist()} == {
        "1",
        "2",
        "1/image_to_text",
        "2/image_to_text",
    }
    assert {r["split"] for r in out.items.to_pylist()} == {"validation"}
    table = pq.read_table(folder / "validation_unique-00000-of-00001.parquet")
    pq.write_table(table.drop_columns(["label_1"]), tmp_path / "nolabel.parquet")
    with pytest.raises(SourceError, match=r"nolabel.parquet has no column 'label_1'"):
        load_source("pickapic", "pap", {"path": str(tmp_path / "nolabel.parquet")})
    with pytest.raises(SourceError, match="does not exist"):
        load_source("pickapic", "pap", {"path": str(tmp_path / "nowhere")})


# --------------------------------------------------------------------------- image folders


def imagefolder_fixture(tmp_path) -> tuple[str, str, str]:
    root = tmp_path / "imagenet"
    for concept, n in (("n02084071", 3), ("n02121808", 2), ("n99999999", 1)):
        (root / concept).mkdir(parents=True)
        for k in range(n):
            ext = "JPEG" if k % 2 == 0 else "png"
            data = jpeg(k) if ext == "JPEG" else png(k)
            (root / concept / f"{concept}_{k}.{ext}").write_bytes(data)
    (root / "n02084071" / "README.txt").write_text("not an image")
    (root / "n02121808" / "empty.jpg").write_bytes(b"")
    (tmp_path / "secret.png").write_bytes(png(5))
    os.symlink(tmp_path / "secret.png", root / "n02121808" / "link.png")
    for concept in ("n03126707", "n02012849"):  # two concepts named by one word
        (root / concept).mkdir()
        (root / concept / "x.jpg").write_bytes(jpeg(9))
    words = tmp_path / "words.csv"
    words.write_text(
        "concept,word,aliases,frequency,polysemy\n"
        "n02084071,dog,domestic dog|Canis familiaris,120.5,7\n"
        "n02121808,cat,house cat|domestic cat,80,\n"
        "n03126707,crane,,12,4\n"
        "n02012849,crane,,12,4\n"
        "n01440764,tench,Tinca tinca,0.3,1\n"  # no folder: left out
    )
    sentences = tmp_path / "sentences.tsv"
    sentences.write_text(
        "word\tsentence\n"
        "dog\tThe dog chased the ball across the yard.\n"
        "dog\tA Dog slept by the fire.\n"
        "dog\tThe puppy barked all night.\n"  # no "dog" in it
        "cat\tMy cat ignores everyone.\n"
        "zebra\tA zebra grazed.\n"  # no such concept
        "crane\tA crane stood in the marsh.\n"
    )
    return str(root), str(words), str(sentences)


def test_imagefolder_items_concepts_and_sentences(tmp_path):
    root, words, sentences = imagefolder_fixture(tmp_path)
    params = {"root": root, "words": words, "sentences": sentences}
    out = load_source("imagefolder", "inet", params)
    images, texts = by_id(out.items, "image"), by_id(out.items, "text")
    assert set(images) == {
        "n02084071/n02084071_0.JPEG",
        "n02084071/n02084071_1.png",
        "n02084071/n02084071_2.JPEG",
        "n02121808/n02121808_0.JPEG",
        "n02121808/n02121808_1.png",
        "n03126707/x.jpg",
        "n02012849/x.jpg",
    }  # n99999999 is not in the word list; README.txt is no image
    dog = images["n02084071/n02084071_0.JPEG"]
    assert dog["role"] == "exemplar" and dog["concept"] == "n02084071"
    assert texts["ctx-n02084071-0000"]["word"] == "dog"
    assert texts["ctx-n02084071-0000"]["role"] == "context"
    assert texts["ctx-n02084071-0001"]["text"] == "A Dog slept by the fire."
    assert texts["ctx-n02121808-0000"]["concept"] == "n02121808"
    assert {texts[f"ctx-{c}-0000"]["word"] for c in ("n03126707", "n02012849")} == {"crane"}

    bad = refused(out)
    assert bad[("n02121808/empty.jpg", "image")]["stage"] == "read"
    assert "zero-byte" in bad[("n02121808/empty.jpg", "image")]["reason"]
    assert "escapes" in bad[("n02121808/link.png", "image")]["reason"]
    unused = bad[("ctx-n02084071-0002", "text")]
    assert unused["stage"] == "validate" and "'dog' does not occur" in unused["reason"]
    assert "'zebra'" in bad[("row-5", "text")]["reason"]

    concepts = {c["concept"]: c for c in out.tables["concepts"].to_pylist()}
    assert out.tables["concepts"].schema == CONCEPTS_SCHEMA
    assert set(concepts) == {"n02084071", "n02121808", "n03126707", "n02012849"}
    assert concepts["n02084071"]["aliases"] == ["dog", "domestic dog", "Canis familiaris"]
    assert concepts["n02084071"]["frequency"] == 120.5 and concepts["n02084071"]["polysemy"] == 7
    assert concepts["n02121808"]["polysemy"] is None
    assert concepts["n03126707"]["aliases"] == ["crane"]


def test_imagefolder_without_word_list_and_limits(tmp_path):
    root = tmp_path / "folders"
    (root / "golden_retriever").mkdir(parents=True)
    for k in range(4):
        (root / "golden_retriever" / f"{k}.png").write_bytes(png(k))
    sentences = tmp_path / "sentences.jsonl"
    lines = [
        {"word": "golden retriever", "sentence": f"A golden retriever, number {k}."}
        for k in range(3)
    ]
    sentences.write_text("\n".join(json.dumps(x) for x in lines))
    out = load_source(
        "imagefolder",
        "f",
        {
            "root": str(root),
            "sentences": str(sentences),
            "images_per_concept": 2,
            "sentences_per_concept": 1,
        },
    )
    assert set(by_id(out.items, "image")) == {"golden_retriever/0.png", "golden_retriever/1.png"}
    assert [t["word"] for t in by_id(out.items, "text").values()] == ["golden retriever"]
    assert out.tables["concepts"].to_pylist()[0]["aliases"] == ["golden retriever"]


def test_imagefolder_quarantines_folders_missing_from_the_word_list(tmp_path):
    root = tmp_path / "shapes"
    for folder, n in (("red_circle", 2), ("blue_square", 1), ("purple_star", 2)):
        (root / folder).mkdir(parents=True)
        for k in range(n):
            (root / folder / f"{k}.png").write_bytes(png(k))
    (root / "purple_star" / "notes.txt").write_text("not an image")
    words = tmp_path / "words.csv"
    words.write_text("concept,word,aliases\nred_circle,circle,\nblue_square,square,\n")
    out = load_source("imagefolder", "f", {"root": str(root), "words": str(words)})

    assert set(by_id(out.items, "image")) == {
        "red_circle/0.png",
        "red_circle/1.png",
        "blue_square/0.png",
    }
    bad = refused(out)
    assert set(bad) == {("purple_star/0.png", "image"), ("purple_star/1.png", "image")}
    for (item_id, _), row in bad.items():
        assert row["stage"] == "validate" and row["model"] is None
        assert row["reason"] == f"folder 'purple_star' is not listed in the words file {words}"
        assert row["source"] == f"{root}:{item_id}"
    # Every image file is either an item or a quarantine row: none vanishes.
    files = {f"{p.parent.name}/{p.name}" for p in root.rglob("*.png")}
    assert files == set(by_id(out.items, "image")) | {k for k, _ in bad}
    assert {c["concept"] for c in out.tables["concepts"].to_pylist()} == {
        "red_circle",
        "blue_square",
    }

    # The refusals reach the lake's quarantine view, where `vlray sql` reports them.
    lake = Lake(str(tmp_path / "lake"))
    lake.write_items("f", out.items, out.quarantine, "run-test")
    counts = run_query(
        connect(lake), "SELECT stage, count(*) AS n FROM quarantine GROUP BY stage"
    ).to_pylist()
    assert counts == [{"stage": "validate", "n": 2}]


def test_imagefolder_bad_word_lists(tmp_path):
    root, _, _ = imagefolder_fixture(tmp_path)
    no_word = tmp_path / "no-word.csv"
    no_word.write_text("concept,name\nn02084071,dog\n")
    with pytest.raises(SourceError, match=r"no-word.csv has no column 'word'"):
        load_source("imagefolder", "f", {"root": root, "words": str(no_word)})
    bad_number = tmp_path / "bad-number.tsv"
    bad_number.write_text("concept\tword\taliases\tpolysemy\nn02084071\tdog\t\tmany\n")
    with pytest.raises(SourceError, match=r"row 1, column 'polysemy'"):
        load_source("imagefolder", "f", {"root": root, "words": str(bad_number)})
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("concept,word\nn02084071,dog\nn02084071,hound\n")
    with pytest.raises(SourceError, match=r"row 2: concept 'n02084071' repeats"):
        load_source("imagefolder", "f", {"root": root, "words": str(repeated)})
    with pytest.raises(SourceError, match="unknown extension"):
        load_source("imagefolder", "f", {"root": root, "words": str(tmp_path / "secret.png")})


# --------------------------------------------------------------------------- generic Parquet


def test_parquet_hf_structs_lists_and_paths(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "on-disk.png").write_bytes(png(3))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "key": ["w0", "w1", "w2", "w3", "w1", "w4"],
            "image": pa.array(
                [
                    {"bytes": jpeg(0), "path": None},
                    {"bytes": jpeg(1), "path": "ignored.jpg"},
                    {"bytes": None, "path": "on-disk.png"},
                    None,
                    {"bytes": jpeg(4), "path": None},
                    {"bytes": None, "path": "../escape.png"},
                ],
                image_type,
            ),
            "text": [["a tower", "a tall tower"], ["a river"], ["a boat"], ["x"], ["dup"], []],
        }
    )
    path = tmp_path / "wit_1024.parquet"
    pq.write_table(table, path)
    params = {"path": str(path), "image_column": "image", "text_column": "text"}
    out = load_source(
        "parquet", "wit", {**params, "id_column": "key", "root": str(tmp_path / "img")}
    )
    images, texts = by_id(out.items, "image"), by_id(out.items, "text")
    assert set(images) == {"w0", "w1", "w2"}
    assert images["w0"]["image"] == jpeg(0) and images["w1"]["image"] == jpeg(1)
    assert images["w2"]["image"] is None and images["w2"]["image_path"].endswith("on-disk.png")
    assert set(texts) == {"w0#c0", "w0#c1", "w1#c0", "w2#c0", "w3#c0"}
    assert texts["w0#c1"]["pair_id"] == "w0" and texts["w0#c1"]["text"] == "a tall tower"
    bad = refused(out)
    assert (
        "no image" in bad[("w3", "image")]["reason"] and ":row 4" in bad[("w3", "image")]["reason"]
    )
    assert "duplicate id 'w1'" in bad[("w1", "text")]["reason"]
    assert "escapes" in bad[("w4", "image")]["reason"]
    assert "empty list" in bad[("w4", "text")]["reason"]

    no_root = load_source("parquet", "wit", params)
    assert "no root" in refused(no_root)[("row-3", "image")]["reason"]
    with pytest.raises(SourceError, match=r"wit_1024.parquet has no column 'caption'"):
        load_source("parquet", "wit", {"path": str(path)})


def test_parquet_plain_binary_and_string(tmp_path):
    table = pa.table({"jpg": [jpeg(0), jpeg(1), b""], "txt": ["one", "two", "three"]})
    pq.write_table(table, tmp_path / "test-0000.parquet")
    out = load_source(
        "parquet", "p", {"path": str(tmp_path), "image_column": "jpg", "text_column": "txt"}
    )
    assert set(by_id(out.items, "image")) == {"row-1", "row-2"}
    assert by_id(out.items, "text")["row-3"]["text"] == "three"
    assert {r["split"] for r in out.items.to_pylist()} == {"test"}
    assert refused(out)[("row-3", "image")]["stage"] == "validate"


# --------------------------------------------------------------------------- WebDataset


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shard(tmp_path):
    shard = tmp_path / "shards" / "train-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        tar.addfile(tarfile.TarInfo("shard"), None)  # a bare header entry, no payload
        add_member(tar, "0001.jpg", jpeg(1))
        add_member(tar, "0001.txt", b"a dog on a beach\n")
        add_member(tar, "0001.json", b'{"url": "x"}')
        add_member(tar, "0002.jpg", jpeg(2))
        add_member(tar, "0003.txt", b"only words")
        add_member(tar, "0004.png", png(4))
        add_member(tar, "0004.txt", b"\xff\xfe not utf-8")
        add_member(tar, "sub/0005.jpeg", jpeg(5))
        add_member(tar, "sub/0005.txt", b"a nested sample")
    out = load_source("webdataset", "wds", {"path": str(shard.parent)})
    images, texts = by_id(out.items, "image"), by_id(out.items, "text")
    assert set(images) == {"0001", "0002", "0004", "sub/0005"}
    assert images["0001"]["image"] == jpeg(1) and images["0001"]["pair_id"] == "0001"
    assert set(texts) == {"0001", "0003", "sub/0005"}
    assert texts["0001"]["text"] == "a dog on a beach"
    bad = refused(out)
    assert "no .txt" in bad[("0002", "text")]["reason"]
    assert "no image" in bad[("0003", "image")]["reason"]
    assert bad[("0004", "text")]["stage"] == "decode"
    assert {r["split"] for r in out.items.to_pylist()} == {"train"}
    assert load_source("webdataset", "w", {"path": str(shard), "limit": 1}).items.num_rows == 2

    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is no tar archive" * 40)
    with pytest.raises(SourceError, match="broken.tar"):
        load_source("webdataset", "w", {"path": str(broken)})


# --------------------------------------------------------------------------- sources and lake


def test_sources_without_extras_and_unknown_tables(monkeypatch):
    params = {"n_scenes": 1, "sentences_per_concept": 1, "perturbations": False, "image_size": 64}
    out = load_source("shapes", "s", params)
    assert isinstance(out, SourceOutput) and set(out.tables) == {"trials", "concepts"}
    # scene 0: a lexical, a binding and a relation trial, each both ways
    assert out.tables["trials"].num_rows == 6 and out.tables["concepts"].num_rows == 24
    assert set(load_source("shapes", "s", {**params, "foils": False}).tables) == {"concepts"}

    def plain(dataset: str) -> tuple:
        return out.items, out.quarantine

    def odd(dataset: str) -> tuple:
        return out.items, out.quarantine, {"votes": trials_table([])}

    monkeypatch.setitem(SOURCES, "plain", plain)
    assert load_source("plain", "p", {}).tables == {}
    monkeypatch.setitem(SOURCES, "odd", odd)
    with pytest.raises(ValueError, match="unknown table 'votes'"):
        load_source("odd", "o", {})

    # A source written before trials had a kind: its trials load, kind null.
    def kindless(dataset: str) -> tuple:
        return out.items, out.quarantine, {"trials": out.tables["trials"].drop_columns(["kind"])}

    monkeypatch.setitem(SOURCES, "kindless", kindless)
    trials = load_source("kindless", "k", {}).tables["trials"]
    assert trials.schema == TRIALS_SCHEMA and trials["kind"].null_count == trials.num_rows == 6


def test_extra_tables_in_the_lake_and_views(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.storage.fs.create_dir(lake.storage.root, recursive=True)
    con = connect(lake)
    for view in ("trials", "concepts"):
        assert run_query(con, f"SELECT count(*) AS n FROM {view}").to_pylist() == [{"n": 0}]
    trials = trials_table(
        [
            {
                "trial_id": "1",
                "direction": "text_to_image",
                "query_item_id": "c",
                "choice_item_ids": ["a", "b"],
                "preferred": None,
                "label": [0.5, 0.5],
                "split": "train",
            }
        ]
    )
    lake.write_table_for("pick a pic", "trials", trials, "run-1")
    version = lake.version("trials")
    lake.write_table_for("pick a pic", "trials", trials, "run-2")  # same rows: no commit
    assert lake.version("trials") == version
    assert lake.read_table_for("pick a pic", "trials").equals(trials)
    rows = run_query(connect(lake), "SELECT * FROM trials").to_pylist()
    assert rows[0]["dataset"] == "pick a pic" and rows[0]["tie"] and rows[0]["label"] == [0.5, 0.5]
    assert rows[0]["direction"] == "text_to_image" and rows[0]["choice_item_ids"] == ["a", "b"]
    assert run_query(connect(lake), "SELECT count(*) AS n FROM concepts").to_pylist()[0]["n"] == 0
    lake.remove_table_for("pick a pic", "trials")
    assert lake.read_table_for("pick a pic", "trials").num_rows == 0
    assert lake.version("trials") == version + 1  # removed in one commit; older versions keep it


# --------------------------------------------------------------------------- end to end


@pytest.mark.timeout(420)
def test_extract_pickapic_end_to_end(ray_session, tmp_path):
    """Pick-a-Pic through the real job with tiny models: every trial's caption and images are
    embedded and join up through the views. (One dataset only: each model job costs ~30 s
    here; the concepts table's path through the lake is covered above.)"""
    from vlray.config import validate_config
    from vlray.pipeline import run_extract

    config = {
        "datasets": [
            {
                "name": "pap",
                "source": "pickapic",
                "params": {"path": pickapic_fixture(tmp_path / "train-00000.parquet")},
            }
        ],
        "models": ["tiny_vit_random", "tiny_gpt2_random"],
        "extract": {"batch_size": 16},
    }
    lake = str(tmp_path / "lake")
    summary = run_extract(validate_config(config, "test config"), lake)
    assert summary.refused_by_source == {"pap": 3}  # u-i's bytes, ranking 6's caption, 7's labels
    con = connect(lake)
    trials = run_query(
        con,
        """
        SELECT t.trial_id, t.direction, t.preferred, t.tie,
               count(DISTINCT e.item_id) AS images_embedded,
               count(DISTINCT c.item_id) AS captions_embedded
        FROM trials t
        LEFT JOIN embeddings e ON e.dataset = t.dataset AND e.model = 'tiny_vit_random'
             AND e.perturbation = 'none'
             AND (list_contains(t.choice_item_ids, e.item_id) OR e.item_id = t.query_item_id)
        LEFT JOIN embeddings c ON c.dataset = t.dataset AND c.model = 'tiny_gpt2_random'
             AND (list_contains(t.choice_item_ids, c.item_id) OR c.item_id = t.query_item_id)
        GROUP BY ALL ORDER BY t.trial_id
        """,
    ).to_pylist()
    forward = [r for r in trials if r["direction"] == "text_to_image"]
    assert [r["trial_id"] for r in forward] == ["1", "2", "3", "4"]
    assert [(r["preferred"], r["tie"]) for r in forward] == [
        (0, False),
        (1, False),
        (None, True),
        (1, False),
    ]
    assert all(r["images_embedded"] == 2 and r["captions_embedded"] == 1 for r in forward)
    back = [r for r in trials if r["direction"] == "image_to_text"]
    assert [r["trial_id"] for r in back] == [
        "1/image_to_text",
        "2/image_to_text",
        "4/image_to_text",
    ]
    assert all(r["images_embedded"] == 1 and r["captions_embedded"] == 2 for r in back)
    counts = run_query(
        con,
        """
        SELECT (SELECT count(*) FROM concepts) AS concepts,
               (SELECT count(DISTINCT item_id) FROM embeddings WHERE modality = 'image') AS images,
               (SELECT count(*) FROM quarantine WHERE model IS NULL AND modality IS NULL) AS trials
        """,
    ).to_pylist()
    assert counts == [{"concepts": 0, "images": 12, "trials": 1}]
