"""Tests of the embedded shapes world (vlray.sources.shapes)."""

from __future__ import annotations

import collections
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from vlray.items import ITEMS_SCHEMA
from vlray.sources import shapes

N_CONCEPTS = 24


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return shapes.generate()


@pytest.fixture(scope="module")
def rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


@pytest.fixture(scope="module")
def by_key(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["item_id"], r["modality"], r["perturbation"]): r for r in rows}


def _pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"])))


def _graph(row: dict) -> dict:
    return json.loads(row["scene_graph"])


def _perturbed_images(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r["modality"] == "image" and r["perturbation"] == name]


def _original(by_key: dict, row: dict) -> dict:
    return by_key[(row["item_id"], row["modality"], "none")]


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# --- constants --------------------------------------------------------------------------------


def test_concepts_are_24_balanced_colour_shape_pairs() -> None:
    assert len(shapes.CONCEPTS) == N_CONCEPTS == len(set(shapes.CONCEPTS))
    assert len(shapes.SHAPES) == 8
    colours = collections.Counter(c.split(" ", 1)[0] for c in shapes.CONCEPTS)
    shape_counts = collections.Counter(c.split(" ", 1)[1] for c in shapes.CONCEPTS)
    assert set(colours) == set(shapes.COLOURS) and set(colours.values()) == {4}
    assert set(shape_counts) == set(shapes.SHAPES) and set(shape_counts.values()) == {3}


def test_aliases_start_with_the_concept() -> None:
    assert set(shapes.ALIASES) == set(shapes.CONCEPTS)
    assert all(aliases[0] == concept for concept, aliases in shapes.ALIASES.items())
    assert "red box" in shapes.ALIASES["red square"]


# --- table shape --------------------------------------------------------------------------------


def test_schema_source_and_unique_keys(table: pa.Table, rows: list[dict]) -> None:
    assert table.schema.equals(ITEMS_SCHEMA)
    assert {r["source"] for r in rows} == {"shapes:seed=0"}
    keys = [(r["item_id"], r["modality"], r["perturbation"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {r["split"] for r in rows} == {"train", "test"}
    assert all(r["image_path"] is None for r in rows)


def test_default_counts_per_role_and_perturbation(rows: list[dict]) -> None:
    counts = collections.Counter((r["role"], r["modality"], r["perturbation"]) for r in rows)
    exemplars, scenes, captions = N_CONCEPTS * 8, 64, 3
    assert counts[("exemplar", "image", "none")] == exemplars
    assert counts[("scene", "image", "none")] == scenes
    assert counts[("caption", "text", "none")] == (exemplars + scenes) * captions
    assert counts[("context", "text", "none")] == N_CONCEPTS * 10
    for name in shapes.IMAGE_PERTURBATIONS:
        assert counts[("scene", "image", name)] == scenes
    for name in shapes.TEXT_PERTURBATIONS:
        assert counts[("caption", "text", name)] == scenes * captions
    assert len(rows) == 2608


def test_counts_follow_the_arguments() -> None:
    rows = shapes.generate(
        n_scenes=3,
        exemplars_per_concept=9,
        captions_per_image=2,
        sentences_per_concept=4,
        image_size=96,
        perturbations=False,
    ).to_pylist()
    counts = collections.Counter(r["role"] for r in rows)
    assert counts == {
        "exemplar": N_CONCEPTS * 9,
        "scene": 3,
        "caption": (N_CONCEPTS * 9 + 3) * 2,
        "context": N_CONCEPTS * 4,
    }
    assert {r["perturbation"] for r in rows} == {"none"}
    sizes = {Image.open(io.BytesIO(r["image"])).size for r in rows if r["modality"] == "image"}
    assert sizes == {(96, 96)}


def test_at_least_eight_exemplars_per_concept(rows: list[dict]) -> None:
    per_concept = collections.Counter(r["concept"] for r in rows if r["role"] == "exemplar")
    assert set(per_concept) == set(shapes.CONCEPTS)
    assert min(per_concept.values()) >= 8
    # Both splits hold every concept, so a probe can train and test on all of them.
    for split in ("train", "test"):
        assert {r["concept"] for r in rows if r["role"] == "exemplar" and r["split"] == split} == (
            set(shapes.CONCEPTS)
        )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"exemplars_per_concept": 7}, "exemplars_per_concept"),
        ({"n_scenes": -1}, "n_scenes"),
        ({"seed": -5}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"captions_per_image": 0}, "captions_per_image"),
        ({"captions_per_image": 99}, "captions_per_image"),
        ({"sentences_per_concept": 0}, "sentences_per_concept"),
        ({"image_size": 8}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"perturbations": "yes"}, "perturbations"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        shapes.generate(**kwargs)


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs() -> None:
    a = shapes.generate(seed=3, n_scenes=4)
    b = shapes.generate(seed=3, n_scenes=4)
    c = shapes.generate(seed=4, n_scenes=4)
    assert _ipc_bytes(a) == _ipc_bytes(b)
    assert _ipc_bytes(a) != _ipc_bytes(c)
    assert a.column("image").to_pylist() != c.column("image").to_pylist()


def test_exemplars_do_not_depend_on_the_number_of_scenes(rows: list[dict]) -> None:
    few = shapes.generate(n_scenes=2).to_pylist()

    def exemplar_images(rs: list[dict]) -> list[bytes]:
        return [r["image"] for r in rs if r["role"] == "exemplar"]

    assert exemplar_images(few) == exemplar_images(rows)


# --- images and scene graphs ------------------------------------------------------------------


def test_images_decode_as_224_rgb(rows: list[dict]) -> None:
    for r in rows:
        if r["modality"] == "image":
            im = Image.open(io.BytesIO(r["image"]))
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (224, 224)
            assert r["scene_graph"] is not None
        else:
            assert r["image"] is None and r["text"]


def test_images_rerender_from_their_scene_graph(rows: list[dict]) -> None:
    images = [r for r in rows if r["modality"] == "image"][::37]
    for r in images:
        again = np.asarray(shapes.render_scene(r["scene_graph"]))
        assert np.array_equal(again, _pixels(r))


def test_scene_graph_json_is_canonical(rows: list[dict]) -> None:
    for r in rows:
        if r["scene_graph"] is not None:
            graph = _graph(r)
            assert r["scene_graph"] == json.dumps(graph, sort_keys=True, separators=(",", ":"))


def test_exemplars_hold_their_concept(rows: list[dict]) -> None:
    for r in rows:
        if r["role"] == "exemplar":
            (obj,) = _graph(r)["objects"]
            assert f"{obj['colour']} {obj['shape']}" == r["concept"]
            assert r["pair_id"] == r["item_id"].rsplit("#", 1)[0]


def test_scenes_have_two_or_three_separated_objects(rows: list[dict]) -> None:
    for r in rows:
        if r["role"] == "scene" and r["perturbation"] == "none":
            graph = _graph(r)
            objects = graph["objects"]
            assert 2 <= len(objects) <= 3 and r["concept"] is None
            related = {frozenset((x["subject"], x["object"])) for x in graph["relations"]}
            # Non-overlapping placement: every pair stands left of or above the other.
            assert len(related) == len(objects) * (len(objects) - 1) // 2
            for o in objects:
                x0, y0, x1, y1 = o["bbox"]
                assert 0 <= x0 < o["x"] < x1 <= 224 and 0 <= y0 < o["y"] < y1 <= 224


def test_remove_object_drops_one_and_changes_the_image(rows: list[dict], by_key: dict) -> None:
    for r in _perturbed_images(rows, "image_semantic/remove_object"):
        orig = _original(by_key, r)
        kept, before = _graph(r)["objects"], _graph(orig)["objects"]
        assert len(kept) == len(before) - 1
        assert all(o in before for o in kept)
        assert not np.array_equal(_pixels(r), _pixels(orig))


def test_appearance_perturbations_keep_the_objects(rows: list[dict], by_key: dict) -> None:
    for name in (
        "image_appearance/background",
        "image_appearance/brightness",
        "image_appearance/blur",
    ):
        for r in _perturbed_images(rows, name):
            orig = _original(by_key, r)
            assert _graph(r)["objects"] == _graph(orig)["objects"]
            assert _graph(r)["relations"] == _graph(orig)["relations"]
            assert not np.array_equal(_pixels(r), _pixels(orig))


def test_translate_keeps_relations_and_moves_the_layout(rows: list[dict], by_key: dict) -> None:
    for r in _perturbed_images(rows, "image_appearance/translate"):
        moved, orig = _graph(r), _graph(_original(by_key, r))
        assert moved["relations"] == orig["relations"]
        attrs = [
            [(o["shape"], o["colour"], o["size"]) for o in g["objects"]] for g in (moved, orig)
        ]
        assert attrs[0] == attrs[1]
        shifts = {
            (round(a["x"] - b["x"], 2), round(a["y"] - b["y"], 2))
            for a, b in zip(moved["objects"], orig["objects"], strict=True)
        }
        assert len(shifts) == 1 and shifts != {(0.0, 0.0)}
        assert all(0 <= v <= 224 for o in moved["objects"] for v in o["bbox"])


def test_swap_attribute_recolours_one_object(rows: list[dict], by_key: dict) -> None:
    for r in _perturbed_images(rows, "image_semantic/swap_attribute"):
        after, before = _graph(r)["objects"], _graph(_original(by_key, r))["objects"]
        changed = [(a, b) for a, b in zip(after, before, strict=True) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        assert a["colour"] != b["colour"] and dict(a, colour=b["colour"]) == b


def test_perturbed_rows_keep_the_original_fields(rows: list[dict], by_key: dict) -> None:
    for r in rows:
        if r["perturbation"] != "none":
            orig = _original(by_key, r)
            for field in ("pair_id", "role", "concept", "split", "source"):
                assert r[field] == orig[field]


# --- texts --------------------------------------------------------------------------------------


def test_captions_pair_with_their_image(rows: list[dict], by_key: dict) -> None:
    for r in rows:
        if r["role"] == "caption" and r["perturbation"] == "none":
            image = by_key[(r["pair_id"], "image", "none")]
            assert r["item_id"].startswith(r["pair_id"] + "#c")
            assert r["split"] == image["split"] and r["concept"] == image["concept"]
            for obj in _graph(image)["objects"]:
                assert f"{obj['size']} {obj['colour']} {obj['shape']}" in r["text"]


def test_scene_captions_use_several_templates(rows: list[dict]) -> None:
    openings = {
        r["text"].split()[0]
        for r in rows
        if r["role"] == "caption" and r["perturbation"] == "none" and r["concept"] is None
    }
    assert {"There", "Two", "An"} <= openings
    assert any(" to the left of " in r["text"] for r in rows if r["role"] == "caption")


def test_context_sentences_contain_their_word(rows: list[dict]) -> None:
    contexts = [r for r in rows if r["role"] == "context"]
    assert contexts
    for r in contexts:
        assert r["word"] == r["concept"] and r["word"] in r["text"]
        assert r["pair_id"] is None
    per_concept = collections.defaultdict(set)
    for r in contexts:
        per_concept[r["concept"]].add(r["text"])
    assert all(len(texts) == 10 for texts in per_concept.values())


def _text_pairs(rows: list[dict], by_key: dict, name: str) -> list[tuple[str, str]]:
    return [
        (r["text"], _original(by_key, r)["text"])
        for r in rows
        if r["modality"] == "text" and r["perturbation"] == name
    ]


def test_text_scramble_is_a_permutation_of_the_words(rows: list[dict], by_key: dict) -> None:
    pairs = _text_pairs(rows, by_key, "text_semantic/scramble")
    assert pairs
    for new, old in pairs:
        assert new != old and sorted(new.split()) == sorted(old.split())


def test_text_appearance_and_swap_change_the_text(rows: list[dict], by_key: dict) -> None:
    for new, old in _text_pairs(rows, by_key, "text_appearance/case"):
        assert new == old.upper()
    for new, old in _text_pairs(rows, by_key, "text_appearance/punctuation"):
        assert new != old and new.rstrip("!") == old.replace(",", "").replace(":", "").rstrip(".")
    for name in ("text_appearance/paraphrase", "text_semantic/swap_attribute"):
        for new, old in _text_pairs(rows, by_key, name):
            assert new != old
    # A colour swap keeps every word but changes which colour goes with which shape.
    for new, old in _text_pairs(rows, by_key, "text_semantic/swap_attribute"):
        assert len(new.split()) == len(old.split())
