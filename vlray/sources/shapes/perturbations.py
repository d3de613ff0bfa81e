"""Perturbations: exact, named edits of a scene graph or of a caption (its text, template or
objects), each drawn or written again from the edited description."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from vlray.sources import SourceError
from vlray.sources.shapes.captions import (
    paraphrase_template,
    relation_chain,
    render_caption,
    stated_relations,
    write_chain,
)
from vlray.sources.shapes.concepts import COLOURS
from vlray.sources.shapes.scene import Effects, Scene, SceneObject, relations_of

IMAGE_PERTURBATIONS: tuple[str, ...] = (
    "image_appearance/background",
    "image_appearance/brightness",
    "image_appearance/blur",
    "image_appearance/translate",
    "image_semantic/remove_object",
    "image_semantic/swap_attribute",
)
TEXT_PERTURBATIONS: tuple[str, ...] = (
    "text_appearance/case",
    "text_appearance/punctuation",
    "text_appearance/paraphrase",
    "text_semantic/scramble",
    "text_semantic/swap_attribute",
    "text_semantic/role_swap",
    "text_semantic/remove_object",
)
# Text perturbations that some captions have no copy of: a role swap only of a caption that
# states relations (a listing caption's nouns can trade places without changing its meaning).
PARTIAL_TEXT_PERTURBATIONS: tuple[str, ...] = ("text_semantic/role_swap",)

# Backgrounds for the recolour perturbation, all far from the light grey of the originals.
_ALT_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (45, 48, 56),
    (70, 95, 125),
    (190, 215, 240),
    (240, 200, 215),
    (200, 235, 195),
)


def free_colours(objects: Sequence[SceneObject]) -> list[str]:
    """The colours no object has, in ``COLOURS`` order."""
    used = {o.colour for o in objects}
    return [c for c in COLOURS if c not in used]


def recolour(objects: Sequence[SceneObject], index: int, colour: str) -> tuple[SceneObject, ...]:
    """The objects with the one at position ``index`` painted ``colour``; nothing else moves."""
    return tuple(replace(o, colour=colour) if i == index else o for i, o in enumerate(objects))


def removed_index(rng: np.random.Generator, n_objects: int) -> int:
    """Which object a remove_object perturbation drops: one draw from its stream."""
    return int(rng.integers(0, n_objects))


def _without(objects: Sequence[SceneObject], drop: int) -> tuple[SceneObject, ...]:
    return tuple(o for i, o in enumerate(objects) if i != drop)


def perturb_scene(name: str, scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene after one named image perturbation (``IMAGE_PERTURBATIONS``)."""
    size, objects = scene.image_size, scene.objects
    if name == "image_appearance/background":
        background = _ALT_BACKGROUNDS[int(rng.integers(0, len(_ALT_BACKGROUNDS)))]
        return replace(scene, background=background)
    if name == "image_appearance/brightness":
        factor = rng.uniform(0.5, 0.7) if rng.integers(0, 2) else rng.uniform(1.3, 1.5)
        return replace(scene, effects=Effects(brightness=round(float(factor), 3)))
    if name == "image_appearance/blur":
        radius = rng.uniform(0.011, 0.016) * size
        return replace(scene, effects=Effects(blur_radius=round(float(radius), 3)))
    if name == "image_appearance/translate":
        return replace(scene, objects=_translate(objects, rng, size))
    if name == "image_semantic/remove_object":
        return replace(scene, objects=_without(objects, removed_index(rng, len(objects))))
    if name == "image_semantic/swap_attribute":
        index = int(rng.integers(0, len(objects)))
        free = free_colours(objects)
        colour = free[int(rng.integers(0, len(free)))]
        return replace(scene, objects=recolour(objects, index, colour))
    raise SourceError(f"unknown image perturbation {name!r}")


def _shift(lo_room: float, hi_room: float, rng: np.random.Generator) -> int:
    """A whole-pixel shift of at least 3 px towards a side with room, never out of frame."""
    options = [(-1, lo_room), (1, hi_room)]
    options = [(sign, room) for sign, room in options if room >= 3]
    if not options:
        return 0
    sign, room = options[int(rng.integers(0, len(options)))]
    return sign * int(rng.integers(3, int(room) + 1))


def _translate(
    objects: Sequence[SceneObject], rng: np.random.Generator, size: int
) -> tuple[SceneObject, ...]:
    """Move the whole layout rigidly, so every relation between objects still holds."""
    boxes = np.array([o.bbox for o in objects])
    edge = 1.0
    dx = _shift(boxes[:, 0].min() - edge, size - edge - boxes[:, 2].max(), rng)
    dy = _shift(boxes[:, 1].min() - edge, size - edge - boxes[:, 3].max(), rng)
    return tuple(o.moved_by(dx, dy) for o in objects)


def _swap_caption_colours(
    objects: Sequence[SceneObject], rng: np.random.Generator
) -> tuple[SceneObject, ...]:
    """Swap two objects' colours where that changes the meaning, else recolour one object."""
    pairs = [
        (i, j)
        for i in range(len(objects))
        for j in range(i + 1, len(objects))
        if objects[i].colour != objects[j].colour
        and (objects[i].shape, objects[i].size) != (objects[j].shape, objects[j].size)
    ]
    if pairs:
        i, j = pairs[int(rng.integers(0, len(pairs)))]
        swapped = recolour(objects, i, objects[j].colour)
        return recolour(swapped, j, objects[i].colour)
    index = int(rng.integers(0, len(objects)))
    free = free_colours(objects)
    return recolour(objects, index, free[int(rng.integers(0, len(free)))])


def _scramble(text: str, rng: np.random.Generator) -> str:
    """A seeded shuffle of the whitespace-separated words that always changes the order."""
    words = text.split()
    if len(set(words)) < 2:
        return text
    while True:
        order = rng.permutation(len(words))
        scrambled = [words[i] for i in order]
        if scrambled != words:
            return " ".join(scrambled)


def _role_swap(
    template: str, objects: Sequence[SceneObject], rng: np.random.Generator
) -> str | None:
    """The relational caption with two objects' noun phrases exchanged around its relation
    words, chosen (seeded) among the exchanges that make it false of the scene; None for a
    caption that states no relation. Exchanging the first two objects always qualifies: it
    reverses the first stated relation."""
    chain = relation_chain(template, objects)
    if chain is None:
        return None
    order, words = chain
    truth = set(relations_of(objects))
    options = []
    for i in range(len(order)):
        for j in range(i + 1, len(order)):
            swapped = list(order)
            swapped[i], swapped[j] = order[j], order[i]
            if not stated_relations(swapped, words) <= truth:
                options.append(swapped)
    if not options:
        return None
    return write_chain(options[int(rng.integers(0, len(options)))], words)


def _caption_without(
    template: str, objects: Sequence[SceneObject], drop: int, image_size: int
) -> str:
    """The caption ``template`` writes of the objects but the one at ``drop``. A relational
    template needs two objects: with one left, the caption names it alone ("A small red
    circle.", the "plain" template of one-object images); a listing template lists it alone."""
    kept = _without(objects, drop)
    if len(kept) == 1 and relation_chain(template, objects) is not None:
        template = "plain"
    return render_caption(template, kept, image_size)


def perturb_caption(
    name: str,
    template: str,
    siblings: Sequence[str],
    objects: Sequence[SceneObject],
    text: str,
    image_size: int,
    rng: np.random.Generator,
    drop: int | None = None,
) -> str | None:
    """One named text perturbation (``TEXT_PERTURBATIONS``) of the scene caption ``text``,
    written by ``template`` of ``objects``; ``siblings`` are the image's caption templates.
    None where the perturbation has no copy of this caption (``PARTIAL_TEXT_PERTURBATIONS``).

    text_semantic/role_swap keeps every word but exchanges two objects' places in the sentence,
    so that what it states is false of the scene; text_semantic/remove_object is the caption of
    the objects but one (the one at ``drop``; if None, drawn from ``rng``), the text twin of
    image_semantic/remove_object.
    """
    if name == "text_appearance/case":
        return text.upper()
    if name == "text_appearance/punctuation":
        return text.replace(",", "").replace(":", "").rstrip(".") + "!"
    if name == "text_appearance/paraphrase":
        return render_caption(paraphrase_template(template, siblings, rng), objects, image_size)
    if name == "text_semantic/scramble":
        return _scramble(text, rng)
    if name == "text_semantic/swap_attribute":
        return render_caption(template, _swap_caption_colours(objects, rng), image_size)
    if name == "text_semantic/role_swap":
        return _role_swap(template, objects, rng)
    if name == "text_semantic/remove_object":
        drop = removed_index(rng, len(objects)) if drop is None else drop
        return _caption_without(template, objects, drop, image_size)
    raise SourceError(f"unknown text perturbation {name!r}")
