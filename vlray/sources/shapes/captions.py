"""Captions of images and context sentences of phrases, each written from a template.

A caption template turns objects (and the image side) into one sentence, so a perturbation can
change the objects, or swap the template for a paraphrase, and write the caption again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from vlray.sources.shapes.scene import SceneObject

_NUMBERS = {1: "One shape", 2: "Two shapes", 3: "Three shapes"}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _np(obj: SceneObject) -> str:
    return _article(f"{obj.size} {obj.colour} {obj.shape}")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _rel_word(a: SceneObject, b: SceneObject) -> str:
    """How ``a`` stands to ``b``; horizontal first, as the captions read left to right."""
    if a.left_of(b):
        return "to the left of"
    if b.left_of(a):
        return "to the right of"
    return "above" if a.above(b) else "below"


def _chain(objects: Sequence[SceneObject]) -> str:
    """ "A X to the left of a Y, which is above a Z." along the given order."""
    text = f"{_cap(_np(objects[0]))} {_rel_word(objects[0], objects[1])} {_np(objects[1])}"
    for a, b in zip(objects[1:], objects[2:], strict=False):
        text += f", which is {_rel_word(a, b)} {_np(b)}"
    return text + "."


def _left_to_right(objects: Sequence[SceneObject]) -> list[SceneObject]:
    return sorted(objects, key=lambda o: (o.x, o.y, o.id))


def _region(obj: SceneObject, image_size: int) -> str:
    col = ("left", "", "right")[min(2, int(3 * obj.x / image_size))]
    row = ("top", "", "bottom")[min(2, int(3 * obj.y / image_size))]
    return f"{row} {col}".strip() or "centre"


_Template = Callable[[Sequence[SceneObject], int], str]

_SHARED_TEMPLATES: dict[str, _Template] = {
    "there_is": lambda objs, _: f"There is {_join([_np(o) for o in objs])}.",
    "picture_with": lambda objs, _: f"A picture with {_join([_np(o) for o in objs])}.",
    "image_showing": lambda objs, _: f"An image showing {_join([_np(o) for o in objs])}.",
    "count": lambda objs, _: f"{_NUMBERS[len(objs)]}: {_join([_np(o) for o in objs])}.",
}
# Scenes: two relational templates (a chain read left to right, and the same relations read
# right to left) that paraphrase each other, and the listing templates that do too.
_SCENE_TEMPLATES: dict[str, _Template] = {
    "relation_forward": lambda objs, _: _chain(_left_to_right(objs)),
    "relation_backward": lambda objs, _: _chain(_left_to_right(objs)[::-1]),
    **_SHARED_TEMPLATES,
}
_SCENE_PARAPHRASE_GROUPS = (("relation_forward", "relation_backward"), tuple(_SHARED_TEMPLATES))
_SINGLE_TEMPLATES: dict[str, _Template] = {
    "plain": lambda objs, _: f"{_cap(_np(objs[0]))}.",
    **_SHARED_TEMPLATES,
    "located": lambda objs, size: f"{_cap(_np(objs[0]))} near the {_region(objs[0], size)}.",
}
MAX_CAPTIONS_PER_IMAGE = min(len(_SCENE_TEMPLATES), len(_SINGLE_TEMPLATES))


def caption_templates(rng: np.random.Generator, n_objects: int, count: int) -> list[str]:
    """``count`` distinct template names for one image; a scene's first states a relation."""
    if n_objects == 1:
        names = list(_SINGLE_TEMPLATES)
        return [names[i] for i in rng.permutation(len(names))[:count]]
    relational, listing = _SCENE_PARAPHRASE_GROUPS
    first = relational[int(rng.integers(0, len(relational)))]
    rest = [t for t in _SCENE_TEMPLATES if t != first]
    return [first] + [rest[i] for i in rng.permutation(len(rest))[: count - 1]]


def render_caption(template: str, objects: Sequence[SceneObject], image_size: int) -> str:
    """The caption that template ``template`` writes of ``objects``."""
    table = _SINGLE_TEMPLATES if len(objects) == 1 else _SCENE_TEMPLATES
    return table[template](objects, image_size)


def paraphrase_template(template: str, siblings: Sequence[str], rng: np.random.Generator) -> str:
    """Another scene template of the same meaning, preferring one the image's other captions
    (``siblings``) do not use."""
    group = next(g for g in _SCENE_PARAPHRASE_GROUPS if template in g)
    others = [t for t in group if t != template]
    unused = [t for t in others if t not in siblings] or others
    return unused[int(rng.integers(0, len(unused)))]


# In-context sentences: ``{np}`` is "a red circle" / "an orange star"; ``{w}`` the bare phrase.
CONTEXT_TEMPLATES: tuple[str, ...] = (
    "I drew {np} on the board.",
    "The {w} rolled away.",
    "She pointed at the {w} in the corner.",
    "{NP} was painted on the door.",
    "He cut {np} out of paper.",
    "The sign showed {np}.",
    "We counted every {w} on the page.",
    "Nobody noticed the {w} at first.",
    "My favourite sticker is the {w}.",
    "The teacher held up {np}.",
    "Look, there is {np} next to the window!",
    "The logo is a simple {w}.",
    "There was {np} on the map.",
    "They hung {np} above the door.",
    "The child coloured in {np}.",
    "Suddenly {np} appeared on the screen.",
)


def context_sentence(template: str, phrase: str) -> str:
    """One of ``CONTEXT_TEMPLATES`` filled with ``phrase`` (bare, or with its article)."""
    np_ = _article(phrase)
    return template.format(w=phrase, np=np_, NP=_cap(np_))
