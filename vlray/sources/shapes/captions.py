"""Captions of images and context sentences of phrases, each written from a template.

A caption template turns objects (and the image side) into one sentence, so a perturbation can
change the objects, or swap the template for a paraphrase, and write the caption again. A
relational template reads as a chain (``relation_chain``: the objects in order and the relation
words between them), which a role swap writes again with two objects exchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from vlray.sources.shapes.scene import Relation, SceneObject

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


# What each relation word states, as (predicate, whether the named objects swap roles): "a
# below b" is "b above a".
_REL_STATES = {
    "to the left of": ("left_of", False),
    "to the right of": ("left_of", True),
    "above": ("above", False),
    "below": ("above", True),
}


def write_chain(objects: Sequence[SceneObject], words: Sequence[str]) -> str:
    """ "A X to the left of a Y, which is above a Z.": the objects in this order, ``words[k]``
    (a relation word) between objects k and k + 1, whether or not it is true of them."""
    text = f"{_cap(_np(objects[0]))} {words[0]} {_np(objects[1])}"
    for word, b in zip(words[1:], objects[2:], strict=True):
        text += f", which is {word} {_np(b)}"
    return text + "."


def _chain(objects: Sequence[SceneObject]) -> str:
    """The chain caption along the given order, each relation read off the boxes."""
    pairs = zip(objects, objects[1:], strict=False)
    return write_chain(objects, [_rel_word(a, b) for a, b in pairs])


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
_RELATIONAL_TEMPLATES = ("relation_forward", "relation_backward")
_SCENE_PARAPHRASE_GROUPS = (_RELATIONAL_TEMPLATES, tuple(_SHARED_TEMPLATES))
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


def relation_chain(
    template: str, objects: Sequence[SceneObject]
) -> tuple[list[SceneObject], list[str]] | None:
    """The objects in the order relational template ``template`` names them and the relation
    words between neighbours; None for a template that states no relation."""
    if len(objects) < 2 or template not in _RELATIONAL_TEMPLATES:
        return None
    order = _left_to_right(objects)
    if template == "relation_backward":
        order = order[::-1]
    return order, [_rel_word(a, b) for a, b in zip(order, order[1:], strict=False)]


def stated_relations(objects: Sequence[SceneObject], words: Sequence[str]) -> set[Relation]:
    """The relations (by object id) that ``write_chain(objects, words)`` states."""
    stated = set()
    for (a, b), word in zip(zip(objects, objects[1:], strict=False), words, strict=True):
        predicate, swapped = _REL_STATES[word]
        subject, obj = (b, a) if swapped else (a, b)
        stated.add(Relation(subject.id, predicate, obj.id))
    return stated


def caption_words(text: str) -> list[str]:
    """The caption's words, lower case, punctuation dropped, sorted: its bag of words."""
    for mark in ".,:!":
        text = text.replace(mark, " ")
    return sorted(text.lower().split())


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
