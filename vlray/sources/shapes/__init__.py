"""The shapes world: vlray's embedded default dataset, drawn procedurally from a seed.

``generate`` gives its items table: exemplar and scene images with their captions, context
sentences, exactly perturbed copies and near-miss foils; ``world`` gives the same items and the
``shapes`` source's ``trials`` and ``concepts`` tables. Every image is drawn from its typed scene
graph (``Scene``), and every perturbation or foil edits that graph (or a caption's objects) and
draws or writes again, so a changed row differs from its original by exactly the named change.
Forced-choice trials come in three kinds (``vlray.items.TRIAL_KINDS``): a lexical foil's caption
differs from the truth in one word; a binding or relation foil's caption has exactly the truth's
words in another order (checked against both scene graphs), so no bag of words can pass it.
Each item draws from its own random stream (``keys``): adding items moves no other, and the
same seed gives the same bytes. Nothing here touches the network.
"""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa

from vlray.items import concepts_table, items_table, trials_table
from vlray.sources import SourceError
from vlray.sources._common import check_int
from vlray.sources.shapes.captions import CONTEXT_TEMPLATES, MAX_CAPTIONS_PER_IMAGE
from vlray.sources.shapes.concepts import (
    ALIASES,
    COLOUR_RGB,
    COLOUR_WORDS,
    COLOURS,
    CONCEPTS,
    SHAPE_WORDS,
    SHAPES,
    VOCABULARY,
    concept_rows,
)
from vlray.sources.shapes.draw import render_scene
from vlray.sources.shapes.perturbations import (
    IMAGE_PERTURBATIONS,
    PARTIAL_TEXT_PERTURBATIONS,
    TEXT_PERTURBATIONS,
)
from vlray.sources.shapes.rows import context_rows, exemplar_rows, scene_rows, vocabulary_rows
from vlray.sources.shapes.scene import Effects, Relation, Scene, SceneObject
from vlray.sources.shapes.trials import scene_trials

__all__ = [
    "ALIASES",
    "COLOURS",
    "COLOUR_RGB",
    "COLOUR_WORDS",
    "CONCEPTS",
    "CONTEXT_TEMPLATES",
    "IMAGE_PERTURBATIONS",
    "MAX_CAPTIONS_PER_IMAGE",
    "PARTIAL_TEXT_PERTURBATIONS",
    "SHAPES",
    "SHAPE_WORDS",
    "TEXT_PERTURBATIONS",
    "VOCABULARY",
    "Effects",
    "Relation",
    "Scene",
    "SceneObject",
    "generate",
    "render_scene",
    "world",
]


def _build(
    seed: int,
    n_scenes: int,
    exemplars_per_concept: int,
    captions_per_image: int,
    sentences_per_concept: int,
    image_size: int,
    perturbations: bool,
    foils: bool,
    vocabulary: bool,
) -> tuple[pa.Table, list[dict], str]:
    """The checked arguments' items table, trial rows (empty without foils) and source name."""
    seed = check_int("seed", seed, 0)
    n_scenes = check_int("n_scenes", n_scenes, 0)
    exemplars_per_concept = check_int("exemplars_per_concept", exemplars_per_concept, 8)
    captions_per_image = check_int(
        "captions_per_image", captions_per_image, 1, MAX_CAPTIONS_PER_IMAGE
    )
    sentences_per_concept = check_int(
        "sentences_per_concept", sentences_per_concept, 1, len(CONTEXT_TEMPLATES)
    )
    image_size = check_int("image_size", image_size, 64, 2048)
    for name, flag in (
        ("perturbations", perturbations),
        ("foils", foils),
        ("vocabulary", vocabulary),
    ):
        if not isinstance(flag, bool):
            raise SourceError(f"{name} must be True or False, got {flag!r}")

    rows = exemplar_rows(seed, exemplars_per_concept, captions_per_image, image_size)
    rows += context_rows(seed, sentences_per_concept)
    if vocabulary:
        rows += vocabulary_rows(seed, sentences_per_concept)
    trials = []
    for index in range(n_scenes):
        new, kinds = scene_rows(seed, index, captions_per_image, image_size, perturbations, foils)
        rows += new
        if foils:
            trials += scene_trials(seed, index, kinds)
    source = f"shapes:seed={seed}"
    for row in rows + trials:
        row["source"] = source
    return items_table(rows), trials, source


def world(
    seed: int = 0,
    n_scenes: int = 64,
    exemplars_per_concept: int = 8,
    captions_per_image: int = 3,
    sentences_per_concept: int = 10,
    image_size: int = 224,
    perturbations: bool = True,
    foils: bool = True,
    vocabulary: bool = True,
) -> tuple[pa.Table, dict[str, pa.Table]]:
    """The shapes world as the ``shapes`` source gives it: ``generate``'s items table (same
    arguments, same bytes) and its extra tables by name.

    ``trials`` (``TRIALS_SCHEMA``; only if ``foils``): per scene and foil two trials,
    text_to_image (query the scene's first caption ``scene-NNNN#c0``, choices the scene image
    and the foil image) and image_to_text (query the scene image, choices ``scene-NNNN#c0`` and
    the foil's caption), choices in a seeded order, ``preferred`` the index of the true one,
    ``label`` 1 for it and 0 for the foil, ``kind`` the foil's kind: ``scene-NNNN/{direction}``
    (kind "lexical", foil ``scene-NNNN-foil``) for every scene, ``scene-NNNN/binding/{direction}``
    and ``scene-NNNN/relation/{direction}`` (foils ``scene-NNNN-binding``,
    ``scene-NNNN-relation``) for the scenes that have such a foil (``trials`` module).
    ``concepts`` (``CONCEPTS_SCHEMA``): per concept its word, ``ALIASES`` (the word first) and
    the word's Zipf frequency from ``wordfreq``; polysemy null.
    """
    items, trials, source = _build(
        seed,
        n_scenes,
        exemplars_per_concept,
        captions_per_image,
        sentences_per_concept,
        image_size,
        perturbations,
        foils,
        vocabulary,
    )
    tables = {"concepts": concepts_table(concept_rows(source))}
    if foils:
        tables["trials"] = trials_table(trials)
    return items, tables


@functools.wraps(world, assigned=("__module__",))  # world's parameters, defined once
def generate(*args: Any, **kwargs: Any) -> pa.Table:
    """Render the shapes world for ``seed`` as an items table (``vlray.items.ITEMS_SCHEMA``).

    Rows: per concept ``exemplars_per_concept`` exemplar images with ``captions_per_image``
    captions each and ``sentences_per_concept`` context sentences; ``n_scenes`` scene images
    with their captions; and, if ``perturbations``, one copy of every scene image per
    ``IMAGE_PERTURBATIONS`` entry and of every scene caption per ``TEXT_PERTURBATIONS`` entry,
    except that only a caption stating relations has a ``text_semantic/role_swap`` copy
    (``PARTIAL_TEXT_PERTURBATIONS``; every scene's first caption does). If ``vocabulary``,
    ``sentences_per_concept`` context sentences (concept null, ids ``voc-SLUG-KK``) for every
    other ``VOCABULARY`` phrase. If ``foils``, per scene a lexical foil image ``scene-NNNN-foil``
    and its caption ``scene-NNNN-foil#c0``, and where the scene has them a binding foil
    ``scene-NNNN-binding`` and a relation foil ``scene-NNNN-relation`` with their captions
    ``#c0`` (all role "foil", captions from the scene's first caption template). Neither flag
    changes the other rows, and rows added since keep every earlier row's bytes. The same
    arguments give the same bytes.
    """
    return world(*args, **kwargs)[0]
