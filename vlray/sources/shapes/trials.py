"""Forced choice: each scene's foil (one object changed in one attribute) and its two trials."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from vlray.sources.shapes.concepts import SHAPES
from vlray.sources.shapes.keys import Stream, scene_id, scene_split, stream
from vlray.sources.shapes.perturbations import free_colours, recolour
from vlray.sources.shapes.scene import Scene, SceneObject, apart


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
    """The scene with exactly one object changed in one attribute: half the time its shape
    (where some change keeps the layout's relations), else its colour (to one the scene lacks)."""
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


def _choice_trial(
    scene: str,
    direction: str,
    query: str,
    true_and_foil: tuple[str, str],
    split: str,
    rng: np.random.Generator,
) -> dict:
    """One forced-choice trial between the true item and its foil, in a seeded order."""
    order = rng.permutation(2)  # choice k is candidate order[k]; candidate 0 is the true one
    return {
        "trial_id": f"{scene}/{direction}",
        "direction": direction,
        "query_item_id": query,
        "choice_item_ids": [true_and_foil[k] for k in order],
        "preferred": int(np.flatnonzero(order == 0)[0]),
        "label": [1.0 if k == 0 else 0.0 for k in order],
        "split": split,
    }


def scene_trials(seed: int, index: int) -> list[dict]:
    """Scene ``index``'s two ``trials`` rows: its first caption between scene and foil image
    (text_to_image), and the scene image between its first caption and the foil's
    (image_to_text)."""
    rng = stream(seed, Stream.TRIAL, index)
    scene, split = scene_id(index), scene_split(index)
    foil, caption = f"{scene}-foil", f"{scene}#c0"
    return [
        _choice_trial(scene, "text_to_image", caption, (scene, foil), split, rng),
        _choice_trial(scene, "image_to_text", scene, (caption, f"{foil}#c0"), split, rng),
    ]
