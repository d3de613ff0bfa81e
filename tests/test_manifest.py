"""User manifests: good rows become items, bad rows are quarantined, bad files raise."""

from __future__ import annotations

import csv
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlray.items import IMAGE, ITEMS_SCHEMA, QUARANTINE_SCHEMA, TEXT
from vlray.sources.manifest import ManifestError, load_manifest


def png_bytes(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def root(tmp_path):
    """A dataset root with good, empty and linked images, and a file outside it."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "images" / "a.png").write_bytes(png_bytes())
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (30, 30, 200)).save(buf, "JPEG")
    (root / "images" / "b.jpg").write_bytes(buf.getvalue())
    (root / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "outside" / "secret.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "outside" / "secret.png", root / "images" / "link.png")
    return root


def rows_for(root) -> list[dict]:
    """One good row and one of each row-level problem, in manifest order (rows 1..12)."""
    outside = str(root.parent / "outside" / "secret.png")

    def row(item_id, image, caption="a shape", concept=None, split=None):
        return {
            "item_id": item_id,
            "image": image,
            "caption": caption,
            "concept": concept,
            "split": split,
        }

    return [
        row("a", "images/a.png", "a red square", "square", "train"),  # 1 good
        row("b", "images/b.jpg", "a blue square", "square", "test"),  # 2 good
        row("a", "images/b.jpg"),  # 3 duplicate of row 1
        row("", "images/a.png"),  # 4 empty item_id
        row("c", "images/a.png", "   "),  # 5 blank caption, image kept
        row("d", "../outside/secret.png"),  # 6 '..' escapes root
        row("e", "images/link.png"),  # 7 symlink escapes root
        row("f", "images/missing.png"),  # 8 missing file
        row("g", "images/empty.png"),  # 9 zero-byte file
        row("h", None),  # 10 null image
        row("i", outside),  # 11 absolute path outside root
        row("j", str(root / "images" / "a.png")),  # 12 absolute path inside root
    ]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def write_parquet(path, rows) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def by_key(table: pa.Table) -> dict[tuple[str, str], dict]:
    return {(r["item_id"], r["modality"]): r for r in table.to_pylist()}


def assert_rows_balance(n_rows: int, items: pa.Table, quarantine: pa.Table) -> None:
    """Per modality: manifest rows = item rows + quarantine rows."""
    for modality in (IMAGE, TEXT):
        kept = sum(m == modality for m in items.column("modality").to_pylist())
        lost = sum(m == modality for m in quarantine.column("modality").to_pylist())
        assert kept + lost == n_rows, modality


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_rows_and_quarantine(tmp_path, root, fmt: str) -> None:
    rows = rows_for(root)
    manifest = tmp_path / f"manifest.{fmt}"
    {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[fmt](manifest, rows)
    items, quarantine = load_manifest(str(manifest), str(root), "mine")

    assert items.schema == ITEMS_SCHEMA and quarantine.schema == QUARANTINE_SCHEMA
    assert_rows_balance(len(rows), items, quarantine)

    kept = by_key(items)
    assert sorted(k for k in kept if k[1] == IMAGE) == [(x, IMAGE) for x in "abcj"]
    assert sorted(k for k in kept if k[1] == TEXT) == [(x, TEXT) for x in "abdefghij"]
    a_img, a_txt = kept["a", IMAGE], kept["a", TEXT]
    assert a_img["image_path"] == str((root / "images" / "a.png").resolve())
    assert a_img["image"] is None and a_img["role"] == "scene" and a_img["pair_id"] == "a"
    assert a_txt["text"] == "a red square" and a_txt["role"] == "caption"
    assert a_txt["pair_id"] == "a" and a_txt["concept"] == "square"
    assert a_img["source"] == f"{manifest}:row 1" and a_img["perturbation"] == "none"
    assert kept["b", IMAGE]["split"] == "test" and kept["c", IMAGE]["split"] == "train"
    assert kept["j", IMAGE]["image_path"] == a_img["image_path"]

    bad = by_key(quarantine)
    expected = {
        ("a", IMAGE): ("validate", "duplicate item_id 'a' (first used at row 1)", 3),
        ("a", TEXT): ("validate", "duplicate item_id 'a' (first used at row 1)", 3),
        ("row-4", IMAGE): ("validate", "missing or empty item_id", 4),
        ("row-4", TEXT): ("validate", "missing or empty item_id", 4),
        ("c", TEXT): ("validate", "empty caption", 5),
        ("d", IMAGE): ("validate", "escapes the dataset root", 6),
        ("e", IMAGE): ("validate", "escapes the dataset root", 7),
        ("f", IMAGE): ("read", "missing file", 8),
        ("g", IMAGE): ("read", "zero-byte file", 9),
        ("h", IMAGE): ("validate", "image is missing", 10),
        ("i", IMAGE): ("validate", "escapes the dataset root", 11),
    }
    assert set(bad) == set(expected)
    for key, (stage, reason, n) in expected.items():
        assert bad[key]["stage"] == stage, key
        assert reason in bad[key]["reason"], key
        assert bad[key]["source"] == f"{manifest}:row {n}", key
        assert bad[key]["dataset"] == "mine" and "\n" not in bad[key]["reason"]


def test_parquet_with_image_bytes(tmp_path) -> None:
    data = png_bytes()
    manifest = tmp_path / "bytes.parquet"
    table = pa.table(
        {
            "item_id": ["x", "y", "z"],
            "image": pa.array([data, None, b""], pa.binary()),
            "caption": ["a red square", "nothing", "empty"],
        }
    )
    pq.write_table(table, manifest)
    # The root does not exist: with all images inline it is never needed.
    items, quarantine = load_manifest(str(manifest), str(tmp_path / "no-root"), "inline")
    kept = by_key(items)
    assert kept["x", IMAGE]["image"] == data and kept["x", IMAGE]["image_path"] is None
    assert {k for k in by_key(quarantine)} == {("y", IMAGE), ("z", IMAGE)}
    assert_rows_balance(3, items, quarantine)


def test_parquet_with_hugging_face_image_struct(tmp_path, root) -> None:
    data = png_bytes()
    manifest = tmp_path / "hf.parquet"
    image = pa.array(
        [{"bytes": data, "path": None}, {"bytes": None, "path": "images/a.png"}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(
        pa.table({"item_id": ["x", "y"], "image": image, "caption": ["c", "d"]}), manifest
    )
    items, quarantine = load_manifest(str(manifest), str(root), "hf")
    kept = by_key(items)
    assert kept["x", IMAGE]["image"] == data
    assert kept["y", IMAGE]["image_path"].endswith("images/a.png")
    assert quarantine.num_rows == 0


def test_json_array_and_integer_ids(tmp_path, root) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"item_id": 7, "image": "images/a.png", "caption": "hi"}]))
    items, _ = load_manifest(str(manifest), str(root), "d")
    assert items.column("item_id").to_pylist() == ["7", "7"]


def test_csv_ids_stay_text(tmp_path, root) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("item_id,image,caption\n007,images/a.png,hi\n")
    items, _ = load_manifest(str(manifest), str(root), "d")
    assert items.column("item_id").to_pylist() == ["007", "007"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_missing_required_column(tmp_path, root, fmt: str) -> None:
    rows = [{"item_id": "a", "image": "images/a.png"}]
    manifest = tmp_path / f"nocaption.{fmt}"
    {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[fmt](manifest, rows)
    with pytest.raises(ManifestError, match="caption") as info:
        load_manifest(str(manifest), str(root), "d")
    assert str(manifest) in str(info.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("m.txt", b"item_id,image,caption\n", "unknown extension"),
        ("m.parquet", b"not parquet at all", "cannot read Parquet manifest"),
        ("m.jsonl", b"{not json\n", "cannot parse JSON manifest"),
        ("m.csv", b"", "cannot parse CSV manifest"),
    ],
)
def test_unreadable_manifests(tmp_path, root, name: str, content: bytes, message: str) -> None:
    manifest = tmp_path / name
    manifest.write_bytes(content)
    with pytest.raises(ManifestError, match=message):
        load_manifest(str(manifest), str(root), "d")


@pytest.mark.parametrize(
    "content, where",
    [
        ('{"item_id": "x", "image": \n', "line 5: Expecting value at column 27"),  # cut off
        ('["x", "images/a.png", "hi"]\n', "line 5: expected a JSON object"),  # not an object
    ],
)
def test_broken_json_manifest_names_file_and_line(tmp_path, root, content, where) -> None:
    manifest = tmp_path / "broken.jsonl"
    write_jsonl(manifest, rows_for(root)[:3])
    with open(manifest, "a") as f:
        f.write("\n" + content)  # line 4 is blank: skipped, but still counted
    with pytest.raises(ManifestError) as info:
        load_manifest(str(manifest), str(root), "d")
    assert f"cannot parse JSON manifest {manifest} {where}" in str(info.value)


def test_broken_json_array_manifest_names_the_line(tmp_path, root) -> None:
    manifest = tmp_path / "broken.json"
    manifest.write_text(
        '[{"item_id": "a", "image": "images/a.png", "caption": "hi"},\n{"item_id":\n]'
    )
    with pytest.raises(ManifestError, match=r"broken\.json line 3: Expecting value at column 1"):
        load_manifest(str(manifest), str(root), "d")


def test_broken_json_manifest_stops_the_cli_before_the_lake(tmp_path, root, capsys) -> None:
    from vlray.cli import main

    manifest = tmp_path / "broken.jsonl"
    write_jsonl(manifest, rows_for(root)[:3])
    with open(manifest, "a") as f:
        f.write('{"item_id": "x", "image": \n')
    lake = tmp_path / "lake"
    args = ["extract", "--manifest", str(manifest), "--root", str(root)]
    code = main([*args, "--models", "tiny_vit_random", "--lake", str(lake)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{manifest} line 4: Expecting value at column 27" in err
    assert not [p for p in lake.rglob("*") if p.is_file()]  # no items, quarantine nor lock


def test_missing_manifest_and_missing_root(tmp_path, root) -> None:
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(str(tmp_path / "absent.csv"), str(root), "d")
    manifest = tmp_path / "m.jsonl"
    write_jsonl(manifest, rows_for(root)[:1])
    with pytest.raises(ManifestError, match="is not a folder"):
        load_manifest(str(manifest), str(tmp_path / "typo"), "d")


def test_empty_manifest(tmp_path, root) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("item_id,image,caption\n")
    items, quarantine = load_manifest(str(manifest), str(root), "d")
    assert items.num_rows == 0 and quarantine.num_rows == 0
    assert items.schema == ITEMS_SCHEMA
