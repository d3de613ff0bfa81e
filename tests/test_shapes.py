"""Tests of the embedded shapes world (vlray.sources.shapes)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import io
import json
import math
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from vlray.items import CONCEPTS_SCHEMA, ITEMS_SCHEMA, ROLES, TRIAL_KINDS, TRIALS_SCHEMA
from vlray.sources import shapes
from vlray.sources.shapes import Scene
from vlray.sources.shapes.scene import apart

N_CONCEPTS = 24
N_VOCABULARY = 7 * 12  # colour words (6 + violet) x shape words (8 + disc, box, plus sign, rhombus)
# Of the default world's 64 scenes, those with a binding foil and those with a relation foil,
# and its relational captions (each has a role swap): the first of every scene, and 23 others.
N_BINDING, N_RELATION, N_RELATIONAL_CAPTIONS = 50, 52, 87
# Rows added after the digests of test_earlier_rows_and_trials_keep_their_bytes were taken.
ADDED_TEXT_PERTURBATIONS = ("text_semantic/role_swap", "text_semantic/remove_object")


@pytest.fixture(scope="module")
def world() -> tuple[pa.Table, dict[str, pa.Table]]:
    return shapes.world()


@pytest.fixture(scope="module")
def table(world: tuple) -> pa.Table:
    return world[0]


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
    assert counts[("context", "text", "none")] == N_VOCABULARY * 10
    foils = scenes + N_BINDING + N_RELATION
    assert counts[("foil", "image", "none")] == counts[("foil", "text", "none")] == foils
    for name in shapes.IMAGE_PERTURBATIONS:
        assert counts[("scene", "image", name)] == scenes
    for name in shapes.TEXT_PERTURBATIONS:
        partial = name in shapes.PARTIAL_TEXT_PERTURBATIONS
        expected = N_RELATIONAL_CAPTIONS if partial else scenes * captions
        assert counts[("caption", "text", name)] == expected
    # 2608 rows before foils and vocabulary; then 64 lexical foil images and captions and
    # (84 - 24) * 10 vocabulary sentences: 3336 rows until binding and relation foils, role
    # swaps and text remove_object were added.
    assert 2608 + 2 * scenes + (N_VOCABULARY - N_CONCEPTS) * 10 == 3336
    added = 2 * (N_BINDING + N_RELATION) + N_RELATIONAL_CAPTIONS + scenes * captions
    assert len(rows) == 3336 + added == 3819


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
        "context": N_VOCABULARY * 4,
        "foil": (3 + 3 + 2) * 2,  # lexical foils of all 3 scenes, binding 3, relation 2
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
        ({"foils": 1}, "foils"),
        ({"vocabulary": None}, "vocabulary"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        shapes.generate(**kwargs)
    with pytest.raises(ValueError, match=name):
        shapes.world(**kwargs)


def test_world_takes_the_arguments_of_generate() -> None:
    # The source checks its params against generate's signature and calls world.
    assert (
        inspect.signature(shapes.world).parameters == inspect.signature(shapes.generate).parameters
    )


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
    contexts = [r for r in rows if r["role"] == "context" and r["concept"] is not None]
    assert len(contexts) == N_CONCEPTS * 10
    for r in contexts:
        assert r["word"] == r["concept"] and r["word"] in r["text"]
        assert r["pair_id"] is None and r["item_id"].startswith("ctx-")
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


def test_role_swap_keeps_the_words_and_states_false_relations(
    rows: list[dict], by_key: dict
) -> None:
    swaps = [r for r in rows if r["perturbation"] == "text_semantic/role_swap"]
    assert len(swaps) == N_RELATIONAL_CAPTIONS
    for r in swaps:
        old, scene = _original(by_key, r)["text"], _scene(by_key, r["pair_id"])
        assert _bag(r["text"]) == _bag(old) and r["text"] != old
        assert _stated(old, scene) <= _relations(scene)
        assert not _stated(r["text"], scene) <= _relations(scene)
    # Exactly the captions that state a relation have one, the first of every scene among them.
    relational = {
        r["item_id"]
        for r in rows
        if r["role"] == "caption"
        and r["perturbation"] == "none"
        and r["pair_id"].startswith("scene-")
        and re.search(_REL, r["text"])
    }
    assert {r["item_id"] for r in swaps} == relational
    assert {f"scene-{i:04d}#c0" for i in range(64)} <= relational


def test_text_remove_object_drops_one_noun_phrase(rows: list[dict], by_key: dict) -> None:
    removed = [r for r in rows if r["perturbation"] == "text_semantic/remove_object"]
    assert len(removed) == 64 * 3
    n_alone = 0
    for r in removed:
        old = _original(by_key, r)["text"]
        before, after = (
            collections.Counter(re.findall(r"(?:small|large) \w+ \w+", t.lower()))
            for t in (old, r["text"])
        )
        assert sum((before - after).values()) == 1 and not after - before
        # The text twin of the image's remove_object: the same object goes.
        image = by_key[(r["pair_id"], "image", "image_semantic/remove_object")]
        assert set(after) == {
            f"{o['size']} {o['colour']} {o['shape']}" for o in _graph(image)["objects"]
        }
        assert r["text"][0].isupper() and r["text"].endswith(".")
        if sum(after.values()) == 1:  # one object left: named alone, no relation stated
            n_alone += 1
            assert not re.search(_REL, r["text"]) and not r["text"].startswith("Two")
    assert n_alone > 0


# --- vocabulary for concept retrieval ------------------------------------------------------------


def test_vocabulary_sentences_cover_every_alias(rows: list[dict]) -> None:
    contexts = [r for r in rows if r["role"] == "context"]
    words = collections.defaultdict(set)
    for r in contexts:
        assert r["word"] in r["text"] and r["modality"] == "text" and r["pair_id"] is None
        words[r["word"]].add(r["text"])
    assert len(words) == len(shapes.VOCABULARY) == N_VOCABULARY
    assert set(words) == set(shapes.VOCABULARY)
    assert all(len(texts) == 10 for texts in words.values())  # 10 distinct templates each
    for aliases in shapes.ALIASES.values():
        assert set(aliases) <= set(words)
    assert {"violet rhombus", "orange plus sign", "green box"} <= set(words)


def test_vocabulary_rows_have_no_concept(rows: list[dict]) -> None:
    extra = [r for r in rows if r["role"] == "context" and r["word"] not in shapes.CONCEPTS]
    assert len(extra) == (N_VOCABULARY - N_CONCEPTS) * 10
    for r in extra:
        assert r["concept"] is None and r["item_id"].startswith("voc-")
    # "red box" is an alias of "red square", yet only the concept's own word carries it.
    assert {r["concept"] for r in rows if r["word"] == "red box"} == {None}


def test_new_rows_leave_every_other_row_as_it_was() -> None:
    """Foils and vocabulary draw from their own streams: the rest is what it was without them."""
    plain = shapes.generate(n_scenes=5, foils=False, vocabulary=False).to_pylist()
    full = shapes.generate(n_scenes=5).to_pylist()
    kept = [r for r in full if r["role"] != "foil" and not r["item_id"].startswith("voc-")]
    assert kept == plain
    n_foils = sum(r["role"] == "foil" for r in full)
    assert n_foils == (5 + 5 + 4) * 2  # lexical 5, binding 5, relation 4 (image and caption)
    assert len(full) - len(plain) == n_foils + (N_VOCABULARY - N_CONCEPTS) * 10
    assert {r["role"] for r in plain} == {"scene", "exemplar", "caption", "context"}


# --- foils ----------------------------------------------------------------------------------------


def _scene_ids(rows: list[dict]) -> list[str]:
    return [r["item_id"] for r in rows if r["role"] == "scene" and r["perturbation"] == "none"]


def _words(text: str) -> list[str]:
    return [w.strip(".,:") for w in text.split()]


def test_foil_rows_are_their_own_items(rows: list[dict], by_key: dict) -> None:
    assert "foil" in ROLES
    for scene_id in _scene_ids(rows):
        scene = by_key[(scene_id, "image", "none")]
        image = by_key[(f"{scene_id}-foil", "image", "none")]
        caption = by_key[(f"{scene_id}-foil#c0", "text", "none")]
        assert image["role"] == caption["role"] == "foil"
        assert image["pair_id"] == image["item_id"] == caption["pair_id"]
        assert image["split"] == caption["split"] == scene["split"]
        assert image["concept"] is None and caption["concept"] is None
        assert not np.array_equal(_pixels(image), _pixels(scene))
    # Foils have no perturbed copies.
    assert {r["perturbation"] for r in rows if r["role"] == "foil"} == {"none"}


def test_each_foil_changes_one_attribute_of_one_object(rows: list[dict], by_key: dict) -> None:
    changed_attributes = collections.Counter()
    for scene_id in _scene_ids(rows):
        before = _graph(by_key[(scene_id, "image", "none")])
        after = _graph(by_key[(f"{scene_id}-foil", "image", "none")])
        assert (after["background"], after["effects"]) == (before["background"], before["effects"])
        assert after["relations"] == before["relations"]
        assert len(after["objects"]) == len(before["objects"])
        changed = [
            (a, b) for a, b in zip(after["objects"], before["objects"], strict=True) if a != b
        ]
        assert len(changed) == 1
        a, b = changed[0]
        # A new shape redraws the outline (bbox, and a circle has no rotation); nothing else moves.
        diff = {k for k in a if a[k] != b[k]} - {"bbox", "rotation"}
        assert diff in ({"shape"}, {"colour"}), diff
        (attribute,) = diff
        changed_attributes[attribute] += 1
        assert (a["x"], a["y"], a["radius"], a["size"]) == (b["x"], b["y"], b["radius"], b["size"])
        if attribute == "colour":
            assert a["bbox"] == b["bbox"]
            assert a["colour"] not in {o["colour"] for o in before["objects"]}
        kinds = [(o["shape"], o["colour"]) for o in after["objects"]]
        assert len(set(kinds)) == len(kinds)
    assert changed_attributes["shape"] > 0 and changed_attributes["colour"] > 0


def test_foil_caption_differs_in_the_changed_word_only(rows: list[dict], by_key: dict) -> None:
    for scene_id in _scene_ids(rows):
        before = _graph(by_key[(scene_id, "image", "none")])["objects"]
        after = _graph(by_key[(f"{scene_id}-foil", "image", "none")])["objects"]
        (a, b) = [(a, b) for a, b in zip(after, before, strict=True) if a != b][0]
        old_word, new_word = (
            (b["shape"], a["shape"]) if a["shape"] != b["shape"] else (b["colour"], a["colour"])
        )
        true = _words(by_key[(f"{scene_id}#c0", "text", "none")]["text"])
        foil = _words(by_key[(f"{scene_id}-foil#c0", "text", "none")]["text"])
        assert len(true) == len(foil)
        diff = [(t, f) for t, f in zip(true, foil, strict=True) if t != f]
        assert diff == [(old_word, new_word)]


# --- trials and concepts -----------------------------------------------------------------------


def test_trials_between_each_scene_and_its_foils(world: tuple, by_key: dict) -> None:
    trials = world[1]["trials"]
    assert trials.schema.equals(TRIALS_SCHEMA)
    rows = trials.to_pylist()
    kinds = collections.Counter(t["kind"] for t in rows)
    assert kinds == {"lexical": 2 * 64, "binding": 2 * N_BINDING, "relation": 2 * N_RELATION}
    assert set(kinds) <= set(TRIAL_KINDS)
    assert len({t["trial_id"] for t in rows}) == len(rows)
    for t in rows:
        scene, *rest = t["trial_id"].split("/")
        # scene-NNNN/DIRECTION (lexical, as before kinds) or scene-NNNN/KIND/DIRECTION
        kind = "lexical" if len(rest) == 1 else rest[0]
        assert t["kind"] == kind and rest[-1] == t["direction"]
        foil = f"{scene}-foil" if kind == "lexical" else f"{scene}-{kind}"
        caption = f"{scene}#c0"
        # direction -> (query, its modality, the true choice, the foil, the choices' modality)
        query, query_modality, truth, false, modality = {
            "text_to_image": (caption, "text", scene, foil, "image"),
            "image_to_text": (scene, "image", caption, f"{foil}#c0", "text"),
        }[t["direction"]]
        assert t["query_item_id"] == query and (query, query_modality, "none") in by_key
        assert sorted(t["choice_item_ids"]) == sorted([truth, false])
        choices = [by_key[(c, modality, "none")] for c in t["choice_item_ids"]]
        roles = {"scene" if modality == "image" else "caption", "foil"}
        assert {c["role"] for c in choices} == roles
        assert t["choice_item_ids"][t["preferred"]] == truth
        assert t["label"][t["preferred"]] == 1.0 and sum(t["label"]) == 1.0
        assert t["split"] == by_key[(scene, "image", "none")]["split"]
        assert t["source"] == "shapes:seed=0"
    # A scene has a binding or relation trial exactly where it has that foil.
    for kind in ("binding", "relation"):
        with_foil = {r["item_id"][: -len(kind) - 1] for r in _foil_images(by_key, kind)}
        assert {t["trial_id"].split("/")[0] for t in rows if t["kind"] == kind} == with_foil
    # The true item stands first in some trials and second in others, in both directions.
    for kind in TRIAL_KINDS:
        for direction in ("text_to_image", "image_to_text"):
            mine = [t for t in rows if (t["kind"], t["direction"]) == (kind, direction)]
            assert {t["preferred"] for t in mine} == {0, 1}


def _foil_images(by_key: dict, kind: str) -> list[dict]:
    return [r for (i, m, p), r in by_key.items() if i.endswith(f"-{kind}") and m == "image"]


def _scene(by_key: dict, item_id: str) -> Scene:
    return Scene.from_json(by_key[(item_id, "image", "none")]["scene_graph"])


def _bag(text: str) -> list[str]:
    """A caption's bag of words: lower case, punctuation dropped."""
    return sorted(text.lower().replace(",", " ").replace(".", " ").replace(":", " ").split())


_REL = r"(to the left of|to the right of|above|below)"


def _stated(text: str, scene: Scene) -> set[tuple[int, str, int]]:
    """The relations (subject id, predicate, object id) a relational caption states of the
    objects of ``scene`` it names (by colour and shape, unique in a scene)."""
    ids = {(o.colour, o.shape): o.id for o in scene.objects}
    parts = re.split(rf",? (?:which is )?{_REL} ", text.lower().rstrip("."))
    named = [
        ids[re.fullmatch(r"an? (?:small|large) (\w+) (\w+)", np).groups()] for np in parts[::2]
    ]
    stated = set()
    for a, word, b in zip(named, parts[1::2], named[1:], strict=False):
        predicate = "left_of" if "left" in word or "right" in word else "above"
        swapped = word in ("to the right of", "below")
        stated.add((b, predicate, a) if swapped else (a, predicate, b))
    return stated


def _relations(scene: Scene) -> set[tuple[int, str, int]]:
    return {(r.subject, r.predicate, r.object) for r in scene.relations}


def _semantic_trials(world: tuple, by_key: dict, kind: str) -> list[tuple]:
    """(scene, foil scene, true caption, foil caption) of each image_to_text trial of ``kind``,
    the foil found through the trial's choices."""
    out = []
    for t in world[1]["trials"].to_pylist():
        if (t["kind"], t["direction"]) == (kind, "image_to_text"):
            scene, caption = t["query_item_id"], f"{t['query_item_id']}#c0"
            (foil_caption,) = [c for c in t["choice_item_ids"] if c != caption]
            texts = [by_key[(c, "text", "none")]["text"] for c in (caption, foil_caption)]
            foil = by_key[(foil_caption, "text", "none")]["pair_id"]
            out.append((_scene(by_key, scene), _scene(by_key, foil), *texts))
    return out


def test_binding_foils_swap_two_colours_and_keep_every_word(world: tuple, by_key: dict) -> None:
    trials = _semantic_trials(world, by_key, "binding")
    assert len(trials) == N_BINDING
    for scene, foil, true, false in trials:
        assert _bag(true) == _bag(false) and true != false
        assert (foil.image_size, foil.background, foil.effects) == (
            scene.image_size,
            scene.background,
            scene.effects,
        )
        assert foil.relations == scene.relations
        changed = [(a, b) for a, b in zip(foil.objects, scene.objects, strict=True) if a != b]
        assert len(changed) == 2
        (a1, b1), (a2, b2) = changed
        # Only the colours differ, swapped between two objects of different shape.
        assert dataclasses.replace(a1, colour=b1.colour) == b1
        assert dataclasses.replace(a2, colour=b2.colour) == b2
        assert (a1.colour, a2.colour) == (b2.colour, b1.colour) and a1.colour != a2.colour
        assert a1.shape != a2.shape
        assert len({(o.shape, o.colour) for o in foil.objects}) == len(foil.objects)
        # Each caption names its own image's objects, and the foil's recoloured ones are not
        # in the true caption.
        for graph, text in ((scene, true), (foil, false)):
            assert all(f"{o.size} {o.colour} {o.shape}" in text for o in graph.objects)
        assert all(f"{o.size} {o.colour} {o.shape}" not in true for o in (a1, a2))


def test_relation_foils_exchange_two_places_and_keep_every_word(world: tuple, by_key: dict) -> None:
    trials = _semantic_trials(world, by_key, "relation")
    assert len(trials) == N_RELATION
    for scene, foil, true, false in trials:
        assert _bag(true) == _bag(false) and true != false
        assert (foil.background, foil.effects) == (scene.background, scene.effects)
        size = scene.image_size
        moved = []
        for a, b in zip(foil.objects, scene.objects, strict=True):
            kept = ("id", "shape", "colour", "size", "radius", "rotation")
            assert all(getattr(a, k) == getattr(b, k) for k in kept)
            if (a.x, a.y) != (b.x, b.y):
                moved.append(a.id)
        assert len(moved) == 2
        i, j = moved
        assert scene.objects[i].shape != scene.objects[j].shape
        # Each moved object now stands nearer the other's old place than its own.
        for k, other in ((i, j), (j, i)):
            now, was, there = foil.objects[k], scene.objects[k], scene.objects[other]
            assert math.dist((now.x, now.y), (there.x, there.y)) < math.dist(
                (now.x, now.y), (was.x, was.y)
            )
        # A valid scene: inside the margins, every pair apart by the minimum gap.
        for o in (foil.objects[i], foil.objects[j]):
            assert 0.06 * size <= min(o.bbox) and max(o.bbox) <= 0.94 * size
        for k, a in enumerate(foil.objects):
            for b in foil.objects[k + 1 :]:
                assert apart(a, b, size)
        # A relation between the two is reversed.
        before, after = _relations(scene), _relations(foil)
        assert any((j, p, i) in after for (s, p, o) in before if (s, o) == (i, j)) or any(
            (i, p, j) in after for (s, p, o) in before if (s, o) == (j, i)
        )
        # Each caption is true of its own image and false of the other.
        assert _stated(true, scene) <= before and not _stated(true, scene) <= after
        assert _stated(false, foil) <= after and not _stated(false, foil) <= before


def test_earlier_rows_and_trials_keep_their_bytes(rows: list[dict], world: tuple) -> None:
    """The rows and lexical trials of the default world from before binding and relation foils,
    role swaps and text remove_object were added, every field as it was (the image bytes
    through the scene graph that draws them, see test_images_rerender_from_their_scene_graph)."""
    earlier = [
        r
        for r in rows
        if r["perturbation"] not in ADDED_TEXT_PERTURBATIONS
        and not r["item_id"].split("#")[0].endswith(("-binding", "-relation"))
    ]
    assert len(earlier) == 3336
    assert _digest(earlier) == "0ffb3af83c7819b492b2818141b58608b61bcaa1b38c84a9d8b704d85e1f81c8"
    trials = world[1]["trials"].to_pylist()
    lexical = [
        {k: v for k, v in t.items() if k != "kind"} for t in trials if t["kind"] == "lexical"
    ]
    assert len(lexical) == 128
    assert _digest(lexical) == "4bca65edb62f125d4a09c300e46404a0f5682b23271eb19953d31c8d0faf4274"


def _digest(rows: list[dict]) -> str:
    """SHA-256 over the rows' canonical JSON, every field but the image bytes, in order."""
    h = hashlib.sha256()
    for r in rows:
        fields = {k: v for k, v in r.items() if k != "image"}
        h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()


def test_same_seed_same_trials_and_switches() -> None:
    a = shapes.world(seed=3, n_scenes=6, perturbations=False, image_size=64)
    b = shapes.world(seed=3, n_scenes=6, perturbations=False, image_size=64)
    c = shapes.world(seed=4, n_scenes=6, perturbations=False, image_size=64)
    assert a[1]["trials"].equals(b[1]["trials"]) and a[0].equals(b[0])
    preferred = [x[1]["trials"]["preferred"].to_pylist() for x in (a, c)]
    assert preferred[0] != preferred[1]
    assert a[1]["trials"]["source"].to_pylist()[0] == "shapes:seed=3"
    none = shapes.world(n_scenes=2, perturbations=False, image_size=64, foils=False)
    assert set(none[1]) == {"concepts"}
    assert "foil" not in none[0]["role"].to_pylist()
    # world's items are generate's, byte for byte.
    assert a[0].equals(shapes.generate(seed=3, n_scenes=6, perturbations=False, image_size=64))


def test_concepts_table(world: tuple) -> None:
    concepts = world[1]["concepts"]
    assert concepts.schema.equals(CONCEPTS_SCHEMA)
    rows = concepts.to_pylist()
    assert [r["concept"] for r in rows] == list(shapes.CONCEPTS)
    for r in rows:
        assert r["word"] == r["concept"] and r["aliases"][0] == r["concept"]
        assert tuple(r["aliases"]) == shapes.ALIASES[r["concept"]]
        assert math.isfinite(r["frequency"]) and r["frequency"] > 0
        assert r["polysemy"] is None and r["source"] == "shapes:seed=0"
    assert len({r["frequency"] for r in rows}) > 1  # a real lookup, not a constant
