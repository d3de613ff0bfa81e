"""What keeps each row in place as the world grows: item ids, splits and random streams."""

from __future__ import annotations

from enum import IntEnum

import numpy as np

_SPLIT_TEST_FRACTION = 0.2


class Stream(IntEnum):
    """The kind of item a random stream belongs to: each kind draws from its own generator,
    keyed by its index. A new kind takes a new number, so older rows keep their bytes."""

    EXEMPLAR = 1
    SCENE = 2
    CONTEXT = 3
    IMAGE_PERTURB = 4
    TEXT_PERTURB = 5
    FOIL = 6
    VOCABULARY = 7
    TRIAL = 8
    BINDING = 9  # a scene's binding foil (sub-stream 0) and its trials' order (1)
    RELATION = 10  # a scene's relation foil (sub-stream 0) and its trials' order (1)


def stream(seed: int, kind: Stream, *index: int) -> np.random.Generator:
    """The generator of one item of ``kind``, seeded from ``(seed, kind, *index)``."""
    return np.random.default_rng([seed, kind, *index])


def slug(phrase: str) -> str:
    """The phrase as an id part: spaces become hyphens."""
    return phrase.replace(" ", "-")


def split_last(index: int, count: int) -> str:
    """The last ~20% of a concept's items are test: every concept gets the same share."""
    n_test = max(1, round(_SPLIT_TEST_FRACTION * count))
    return "test" if index >= count - n_test else "train"


def scene_id(index: int) -> str:
    """The item id of scene ``index``: scene-NNNN."""
    return f"scene-{index:04d}"


def scene_split(index: int) -> str:
    """Every fifth scene is test, so adding scenes never moves an existing one."""
    return "test" if index % 5 == 4 else "train"
