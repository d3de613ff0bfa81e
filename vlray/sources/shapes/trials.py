"""Forced choice: each scene's foils and their trials.

Three kinds of foil (``vlray.items.TRIAL_KINDS``), each a copy of the scene's graph with one
named edit, drawn again and captioned by the scene's first caption template:

- lexical (``scene-NNNN-foil``, every scene): one object changed in one attribute, its shape or
  its colour, so the foil's caption differs from the scene's in one word;
- binding (``scene-NNNN-binding``): the colours of two objects of different shape swapped
  between them; shapes, places, sizes and so relations are kept;
- relation (``scene-NNNN-relation``): two objects of different shape exchange places (each
  centred where the other was, moved the least that keeps it inside the margins where it would
  not fit there), every object inside the margins and apart from the others by the minimum
  gap, and a relation between the two reversed; colours, shapes and sizes are kept.

A binding or relation foil is made only where it is exact, checked against the scene graphs:
its caption holds the very words of the scene's (the same bag of words, in another order) and
is another text, and for a relation foil each of the two captions states a relation the other
image lacks. Among the pairs of objects that give one, a seeded choice (``keys.Stream.BINDING``
and ``RELATION``). Where no pair gives one, the scene has no foil and no trials of that kind: no
binding foil without two objects that differ in both shape and colour, no relation foil where
no exchange of two objects of different shape fits the frame, keeps the gaps and the words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from itertools import combinations

import numpy as np

from vlray.sources.shapes.captions import (
    caption_words,
    relation_chain,
    render_caption,
    stated_relations,
)
from vlray.sources.shapes.concepts import SHAPES
from vlray.sources.shapes.keys import Stream, scene_id, scene_split, stream
from vlray.sources.shapes.perturbations import free_colours, recolour
from vlray.sources.shapes.scene import Scene, SceneObject, apart, fitted, inside

# The kinds of foil a scene may lack, each with its own random stream (``keys.Stream``).
SEMANTIC_KINDS: dict[str, Stream] = {"binding": Stream.BINDING, "relation": Stream.RELATION}


def _reshaped(scene: Scene, index: int, shape: str) -> tuple[SceneObject, ...] | None:
    """The objects with object ``index`` drawn as ``shape``, or None where that would move a
    relation, close a gap, leave the frame or repeat another object's (shape, colour)."""
    size, objects = scene.image_size, scene.objects
    o = objects[index]
    if shape == o.shape or any((p.shape, p.colour) == (shape, o.colour) for p in objects):
        return None
    new = SceneObject.make(o.id, shape, o.colour, o.radius, o.rotation, o.x, o.y, size)
    others = [p for i, p in enumerate(objects) if i != index]
    if not all(0 <= v <= size for v in new.bbox) or new.size != o.size:
        return None
    if not all(apart(new, p, size) for p in others):
        return None
    changed = tuple(new if i == index else p for i, p in enumerate(objects))
    # Same relations, so every caption template reads the same but for the shape word.
    return changed if replace(scene, objects=changed).relations == scene.relations else None


def foil_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """The lexical foil: the scene with exactly one object changed in one attribute: half the
    time its shape (where some change keeps the layout's relations), else its colour (to one
    the scene lacks)."""
    objects = scene.objects
    if int(rng.integers(0, 2)) == 0:
        options = [
            changed
            for i in range(len(objects))
            for shape in SHAPES
            if (changed := _reshaped(scene, i, shape)) is not None
        ]
        if options:
            return replace(scene, objects=options[int(rng.integers(0, len(options)))])
    index = int(rng.integers(0, len(objects)))
    free = free_colours(objects)
    return replace(scene, objects=recolour(objects, index, free[int(rng.integers(0, len(free)))]))


def _same_words(scene: Scene, foil: Scene, template: str) -> bool:
    """True if ``template`` writes the two scenes' captions with the same bag of words but as
    different texts."""
    size = scene.image_size
    true, false = (render_caption(template, s.objects, size) for s in (scene, foil))
    return true != false and caption_words(true) == caption_words(false)


def _false_of(described: Scene, other: Scene, template: str) -> bool:
    """True if the relations ``template`` states of ``described`` do not all hold in ``other``."""
    chain = relation_chain(template, described.objects)
    return chain is not None and not stated_relations(*chain) <= set(other.relations)


def _colours_swapped(scene: Scene, i: int, j: int, template: str) -> Scene | None:
    """The scene with objects ``i`` and ``j`` (of different shape and colour) in each other's
    colours, if every object keeps a distinct (shape, colour) and the caption its words."""
    objects = scene.objects
    a, b = objects[i], objects[j]
    if a.shape == b.shape or a.colour == b.colour:
        return None
    changed = recolour(recolour(objects, i, b.colour), j, a.colour)
    if len({(o.shape, o.colour) for o in changed}) < len(changed):
        return None
    foil = replace(scene, objects=changed)
    if foil.relations != scene.relations or not _same_words(scene, foil, template):
        return None
    return foil


def _places_exchanged(scene: Scene, i: int, j: int, template: str) -> Scene | None:
    """The scene with objects ``i`` and ``j`` (of different shape) each centred where the other
    was (moved the least that keeps it inside the margins, where the larger one would not fit
    there), if that is a valid scene (every object inside the margins, apart by the gap) in
    which a relation between the two is reversed, with the caption's words and each caption
    false of the other image."""
    size, objects = scene.image_size, scene.objects
    a, b = objects[i], objects[j]
    if a.shape == b.shape:
        return None
    moved = {i: fitted(a.moved_to(b.x, b.y), size), j: fitted(b.moved_to(a.x, a.y), size)}
    changed = tuple(moved.get(k, o) for k, o in enumerate(objects))
    if not all(inside(o, size) for o in moved.values()):
        return None
    if not all(apart(p, q, size) for p, q in combinations(changed, 2)):
        return None
    foil = replace(scene, objects=changed)
    before, after = set(scene.relations), set(foil.relations)
    reversed_ = any(
        replace(r, subject=r.object, object=r.subject) in after
        for r in before
        if {r.subject, r.object} == {a.id, b.id}
    )
    if not reversed_ or before == after or not _same_words(scene, foil, template):
        return None
    if not (_false_of(scene, foil, template) and _false_of(foil, scene, template)):
        return None
    return foil


def _semantic_foil(
    kind: str, scene: Scene, template: str, rng: np.random.Generator
) -> Scene | None:
    """A seeded choice among the exact foils of ``kind`` over every pair of objects."""
    edit = _colours_swapped if kind == "binding" else _places_exchanged
    n = len(scene.objects)
    options = [
        foil
        for i, j in combinations(range(n), 2)
        if (foil := edit(scene, i, j, template)) is not None
    ]
    return options[int(rng.integers(0, len(options)))] if options else None


def semantic_foils(seed: int, index: int, scene: Scene, template: str) -> dict[str, Scene]:
    """Scene ``index``'s binding and relation foils, by kind, for the kinds it has;
    ``template`` is the scene's first caption template (a relational one)."""
    out = {}
    for kind, key in SEMANTIC_KINDS.items():
        foil = _semantic_foil(kind, scene, template, stream(seed, key, index, 0))
        if foil is not None:
            out[kind] = foil
    return out


def _choice_trial(
    trial: str,
    direction: str,
    kind: str,
    query: str,
    true_and_foil: tuple[str, str],
    split: str,
    rng: np.random.Generator,
) -> dict:
    """One forced-choice trial between the true item and its foil, in a seeded order."""
    order = rng.permutation(2)  # choice k is candidate order[k]; candidate 0 is the true one
    return {
        "trial_id": f"{trial}/{direction}",
        "direction": direction,
        "kind": kind,
        "query_item_id": query,
        "choice_item_ids": [true_and_foil[k] for k in order],
        "preferred": int(np.flatnonzero(order == 0)[0]),
        "label": [1.0 if k == 0 else 0.0 for k in order],
        "split": split,
    }


def _trial_pair(
    trial: str, kind: str, scene: str, foil: str, split: str, rng: np.random.Generator
) -> list[dict]:
    """The two trials of one foil: the scene's first caption between scene and foil image
    (text_to_image), and the scene image between its first caption and the foil's
    (image_to_text)."""
    caption = f"{scene}#c0"
    return [
        _choice_trial(trial, "text_to_image", kind, caption, (scene, foil), split, rng),
        _choice_trial(trial, "image_to_text", kind, scene, (caption, f"{foil}#c0"), split, rng),
    ]


def scene_trials(seed: int, index: int, kinds: Sequence[str] = ()) -> list[dict]:
    """Scene ``index``'s ``trials`` rows: two lexical ones (``scene-NNNN/{direction}``, against
    ``scene-NNNN-foil``), then two per kind of ``kinds`` ("binding", "relation": those the scene
    has a foil of) as ``scene-NNNN/{kind}/{direction}`` against ``scene-NNNN-{kind}``."""
    scene, split = scene_id(index), scene_split(index)
    rng = stream(seed, Stream.TRIAL, index)
    rows = _trial_pair(scene, "lexical", scene, f"{scene}-foil", split, rng)
    for kind, key in SEMANTIC_KINDS.items():
        if kind in kinds:
            rng = stream(seed, key, index, 1)
            rows += _trial_pair(f"{scene}/{kind}", kind, scene, f"{scene}-{kind}", split, rng)
    return rows
