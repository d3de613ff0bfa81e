"""Content hashes: one function for every hash the lake stores, and an items fingerprint that
depends on the rows' values, never on how Arrow happens to hold them."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlray.hashing import content_hash, json_hash
from vlray.items import ITEMS_SCHEMA, items_table
from vlray.lake import fingerprints
from vlray.lake.fingerprints import ItemsFingerprint, items_fingerprint


def _items() -> pa.Table:
    """Images (some as bytes, some as paths) and captions, two perturbations, nulls in most
    columns, rows not in key order."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        image = {"image": rng.bytes(int(rng.integers(1, 300)))} if i % 3 else {}
        rows.append(
            {
                "item_id": f"img-{(i * 7) % 12:02d}",
                "modality": "image",
                "pair_id": f"p{i}" if i % 4 else None,
                "role": "exemplar",
                "concept": "red circle" if i % 2 else None,
                "split": "train",
                "image_path": None if image else f"/photos/{i}.png",
                "perturbation": "none" if i < 8 else "image_appearance/blur",
                "source": "test",
                **image,
            }
        )
    for i in range(10):
        rows.append(
            {
                "item_id": f"cap-{(i * 3) % 10:02d}",
                "modality": "text",
                "pair_id": f"p{i}",
                "role": "caption",
                "split": "train",
                "text": f"a red circle, take {i}" if i != 4 else "",
                "word": "circle" if i % 2 else None,
                "perturbation": "none" if i < 6 else "text_appearance/case",
                "source": "test",
            }
        )
    return items_table(rows)


def _with_column(table: pa.Table, name: str, column: pa.Array | pa.ChunkedArray) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name), column)


def _garbage_under_nulls(column: pa.ChunkedArray) -> pa.Array:
    """The same values, each null slot spanning bytes ("junk") instead of none."""
    values = column.to_pylist()
    filled = pa.array([b"junk" if v is None else v for v in values], pa.binary())
    valid = pa.array([v is not None for v in values]).buffers()[1]
    buffers = [valid, *filled.buffers()[1:]]
    odd = pa.Array.from_buffers(pa.binary(), len(values), buffers, column.null_count)
    return odd.cast(column.type)


def _layouts(items: pa.Table) -> dict[str, pa.Table]:
    """The same rows held in other ways."""
    bigger = pa.concat_tables([items.slice(5), items, items.slice(0, 7)]).combine_chunks()
    shuffled = items.take(pa.array(np.random.default_rng(1).permutation(items.num_rows)))
    buffer = io.BytesIO()
    pq.write_table(items, buffer, row_group_size=4)
    # A slice of an array with a null: no null in it, and yet a validity bitmap.
    split = pa.array([*items["split"].to_pylist(), None]).slice(0, items.num_rows)
    assert split.buffers()[0] is not None and split.null_count == 0
    return {
        "sliced out of a bigger table": bigger.slice(items.num_rows - 5, items.num_rows),
        "re-chunked": pa.Table.from_batches(items.to_batches(max_chunksize=3)),
        "concatenated from pieces": pa.concat_tables(
            [items.slice(0, 5), items.slice(5, 1), items.slice(6)]
        ),
        "one chunk per column": items.combine_chunks(),
        "rows in another order": shuffled,
        "through parquet": pq.read_table(io.BytesIO(buffer.getvalue())).cast(ITEMS_SCHEMA),
        "bytes under the nulls": _with_column(
            _with_column(items, "image", _garbage_under_nulls(items["image"])),
            "word",
            _garbage_under_nulls(items["word"]),
        ),
        "a validity bitmap without nulls": _with_column(items, "split", split),
        "large offsets": items.cast(
            pa.schema(
                [
                    f.with_type(pa.large_binary() if f.name == "image" else pa.large_string())
                    for f in ITEMS_SCHEMA
                ]
            )
        ),
    }


def test_the_same_rows_in_any_layout_have_one_fingerprint(monkeypatch):
    items = _items()
    expected = ItemsFingerprint.of(items)
    assert expected.dataset == items_fingerprint(items)
    # Tiny blocks: values gathered from several chunks at once, and put back in order.
    monkeypatch.setattr(fingerprints, "_BLOCK_BYTES", 50)
    for name, table in _layouts(items).items():
        assert table.to_pylist() != [] and table.num_rows == items.num_rows, name
        assert ItemsFingerprint.of(table) == expected, name


def test_changed_content_changes_the_fingerprint_of_its_partition_only():
    items = _items()
    before = ItemsFingerprint.of(items)
    texts = items["text"].to_pylist()
    i = next(k for k, v in enumerate(texts) if v and k < 20)  # an unperturbed caption
    changes = {
        "a caption": _with_column(items, "text", pa.array(texts[:i] + ["other"] + texts[i + 1 :])),
        "an empty caption made null": _with_column(
            items, "text", pa.array([None if v == "" else v for v in texts], pa.string())
        ),
        "an image byte": _with_column(
            items,
            "image",
            pa.array(
                [
                    v if v is None or k != 1 else b"\x00" + v[1:]
                    for k, v in enumerate(items["image"].to_pylist())
                ],
                pa.binary(),
            ),
        ),
    }
    for name, table in changes.items():
        after = ItemsFingerprint.of(table)
        assert after.dataset != before.dataset, name
        changed = {k for k in before.partitions if before.partitions[k] != after.partitions[k]}
        assert len(changed) == 1, (name, changed)
    # Bytes moved from one value to the next: the same bytes joined, other values.
    a = items_table([{"item_id": "a", "modality": "text", "text": "ab", "word": "c"}])
    b = items_table([{"item_id": "a", "modality": "text", "text": "a", "word": "bc"}])
    assert items_fingerprint(a) != items_fingerprint(b)


def test_stored_hash_values_stay_what_they_were():
    """Every lake stores these hashes (model specs' fingerprints and items fingerprints in the
    manifest's config hashes, inputs hashes beside the scores, caption ids): the values, as
    the code before ``vlray.hashing`` computed them, may not change."""
    assert content_hash("a photo of a dog") == "e47e8efa99cbe5d3"
    assert content_hash(b"a photo of a dog") == content_hash([b"a photo", b" of a dog"])
    assert json_hash({"b": [1, None], "a": "x"}) == json_hash({"a": "x", "b": [1, None]})
    assert json_hash({"b": [1, None], "a": "x"}) == "8ea2c0f31b799f04"
    fingerprint = ItemsFingerprint.of(_items())
    assert fingerprint.dataset == "db46a5998b7f178e"
    assert fingerprint.partitions[("text", "none")] == "97656f5325428611"
    assert items_fingerprint(_items().slice(0, 0)) == content_hash(b"")


def test_a_column_that_is_not_text_or_bytes_is_refused():
    items = _items().append_column("n", pa.array(range(22)))
    with pytest.raises(TypeError, match="items column 'n' is int64"):
        items_fingerprint(items)
