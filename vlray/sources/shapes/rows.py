"""Items-table rows: exemplars, scenes with their captions, perturbed copies and foils (lexical,
binding, relation), and context sentences."""

from __future__ import annotations

import numpy as np

from vlray.items import IMAGE, TEXT
from vlray.sources.shapes.captions import (
    CONTEXT_TEMPLATES,
    caption_templates,
    context_sentence,
    render_caption,
)
from vlray.sources.shapes.concepts import CONCEPTS, VOCABULARY
from vlray.sources.shapes.draw import png, render_scene
from vlray.sources.shapes.keys import Stream, scene_id, scene_split, slug, split_last, stream
from vlray.sources.shapes.perturbations import (
    IMAGE_PERTURBATIONS,
    TEXT_PERTURBATIONS,
    perturb_caption,
    perturb_scene,
    removed_index,
)
from vlray.sources.shapes.scene import Scene, exemplar_scene, sample_scene
from vlray.sources.shapes.trials import foil_scene, semantic_foils


def _image_row(
    item_id: str,
    role: str,
    concept: str | None,
    split: str,
    scene: Scene,
    perturbation: str | None = None,
) -> dict:
    return {
        "item_id": item_id,
        "modality": IMAGE,
        "pair_id": item_id,
        "role": role,
        "concept": concept,
        "split": split,
        "image": png(render_scene(scene)),
        "perturbation": perturbation,
        "scene_graph": scene.to_json(),
    }


def _caption_row(
    item_id: str,
    pair_id: str,
    concept: str | None,
    split: str,
    text: str,
    perturbation: str | None = None,
    role: str = "caption",
) -> dict:
    return {
        "item_id": item_id,
        "modality": TEXT,
        "pair_id": pair_id,
        "role": role,
        "concept": concept,
        "split": split,
        "text": text,
        "perturbation": perturbation,
    }


def exemplar_rows(
    seed: int, exemplars_per_concept: int, captions_per_image: int, image_size: int
) -> list[dict]:
    """Per concept ``exemplars_per_concept`` one-object images ex-SLUG-KKK and their captions."""
    rows = []
    for c, concept in enumerate(CONCEPTS):
        for k in range(exemplars_per_concept):
            rng = stream(seed, Stream.EXEMPLAR, c, k)
            scene = exemplar_scene(rng, concept, image_size)
            item_id = f"ex-{slug(concept)}-{k:03d}"
            split = split_last(k, exemplars_per_concept)
            rows.append(_image_row(item_id, "exemplar", concept, split, scene))
            for j, t in enumerate(caption_templates(rng, 1, captions_per_image)):
                text = render_caption(t, scene.objects, image_size)
                rows.append(_caption_row(f"{item_id}#c{j}", item_id, concept, split, text))
    return rows


def _sentence_rows(
    rng: np.random.Generator, prefix: str, phrase: str, concept: str | None, count: int
) -> list[dict]:
    """``count`` context sentences of ``phrase`` from distinct templates, ids PREFIX-SLUG-KK."""
    order = rng.permutation(len(CONTEXT_TEMPLATES))[:count]
    return [
        {
            "item_id": f"{prefix}-{slug(phrase)}-{k:02d}",
            "modality": TEXT,
            "role": "context",
            "concept": concept,
            "split": split_last(k, count),
            "text": context_sentence(CONTEXT_TEMPLATES[t], phrase),
            "word": phrase,
        }
        for k, t in enumerate(order)
    ]


def context_rows(seed: int, sentences_per_concept: int) -> list[dict]:
    """Per concept ``sentences_per_concept`` context sentences that use its word, ctx-SLUG-KK."""
    rows = []
    for c, concept in enumerate(CONCEPTS):
        rng = stream(seed, Stream.CONTEXT, c)
        rows += _sentence_rows(rng, "ctx", concept, concept, sentences_per_concept)
    return rows


def vocabulary_rows(seed: int, sentences_per_concept: int) -> list[dict]:
    """Context sentences of every ``VOCABULARY`` phrase that is no concept, concept null: they
    widen retrieval's candidates but stay out of concept means (which group by concept)."""
    rows = []
    for v, phrase in enumerate(VOCABULARY):
        if phrase not in CONCEPTS:
            rng = stream(seed, Stream.VOCABULARY, v)
            rows += _sentence_rows(rng, "voc", phrase, None, sentences_per_concept)
    return rows


def _foil_pair(item_id: str, foil: Scene, template: str, split: str) -> list[dict]:
    """A foil image and its caption from the scene's first caption template (role "foil")."""
    text = render_caption(template, foil.objects, foil.image_size)
    return [
        _image_row(item_id, "foil", None, split, foil),
        _caption_row(f"{item_id}#c0", item_id, None, split, text, role="foil"),
    ]


def _foil_rows(
    seed: int, index: int, scene: Scene, template: str, split: str
) -> tuple[list[dict], list[str]]:
    """The scene's lexical foil pair (scene-NNNN-foil), then its binding and relation foil
    pairs (scene-NNNN-binding, scene-NNNN-relation) where it has them, and those kinds."""
    lexical = foil_scene(scene, stream(seed, Stream.FOIL, index))
    rows = _foil_pair(f"{scene_id(index)}-foil", lexical, template, split)
    semantic = semantic_foils(seed, index, scene, template)
    for kind, foil in semantic.items():
        rows += _foil_pair(f"{scene_id(index)}-{kind}", foil, template, split)
    return rows, list(semantic)


def scene_rows(
    seed: int,
    index: int,
    captions_per_image: int,
    image_size: int,
    perturbations: bool,
    foils: bool = False,
) -> tuple[list[dict], list[str]]:
    """Scene ``index``'s rows and the kinds of semantic foil it has ("binding", "relation";
    none without ``foils``). Rows: its image and captions; if ``foils``, its foil pairs; if
    ``perturbations``, one perturbed copy of the image per image perturbation and of each
    caption per text perturbation, but no role swap of a caption that states no relation
    (``PARTIAL_TEXT_PERTURBATIONS``). A caption's remove_object drops the object the image's
    does, so the two describe the same edited scene."""
    rng = stream(seed, Stream.SCENE, index)
    scene = sample_scene(rng, image_size)
    item_id, split = scene_id(index), scene_split(index)
    templates = caption_templates(rng, len(scene.objects), captions_per_image)
    captions = [render_caption(t, scene.objects, image_size) for t in templates]
    rows = [_image_row(item_id, "scene", None, split, scene)]
    rows += [
        _caption_row(f"{item_id}#c{j}", item_id, None, split, text)
        for j, text in enumerate(captions)
    ]
    kinds: list[str] = []
    if foils:
        foil_rows, kinds = _foil_rows(seed, index, scene, templates[0], split)
        rows += foil_rows
    if not perturbations:
        return rows, kinds
    for p, name in enumerate(IMAGE_PERTURBATIONS):
        prng = stream(seed, Stream.IMAGE_PERTURB, index, p)
        perturbed = perturb_scene(name, scene, prng)
        rows.append(_image_row(item_id, "scene", None, split, perturbed, name))
    # The object the image's remove_object drops: the first draw of that perturbation's stream.
    removal = IMAGE_PERTURBATIONS.index("image_semantic/remove_object")
    drop = removed_index(stream(seed, Stream.IMAGE_PERTURB, index, removal), len(scene.objects))
    for j, (template, text) in enumerate(zip(templates, captions, strict=True)):
        for p, name in enumerate(TEXT_PERTURBATIONS):
            prng = stream(seed, Stream.TEXT_PERTURB, index, j, p)
            args = (template, templates, scene.objects, text, image_size, prng)
            new = perturb_caption(name, *args, drop=drop)
            if new is not None:
                rows.append(_caption_row(f"{item_id}#c{j}", item_id, None, split, new, name))
    return rows, kinds
