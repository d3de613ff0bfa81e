"""The world's words: colours, shapes, the 24 colour-shape concepts, their aliases and the
vocabulary of every colour-shape phrase."""

from __future__ import annotations

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 60),
    "blue": (31, 90, 220),
    "yellow": (245, 205, 20),
    "purple": (140, 60, 190),
    "orange": (250, 130, 15),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "hexagon",
    "diamond",
    "heart",
)

# Three colours per shape, fixed by hand so that every colour occurs with exactly four shapes
# and no colour set is shared by a group of shapes: colour and shape are then not confounded.
_CONCEPT_COLOURS: dict[str, tuple[str, ...]] = {
    "circle": ("red", "green", "blue"),
    "square": ("red", "yellow", "purple"),
    "triangle": ("green", "yellow", "orange"),
    "star": ("blue", "purple", "orange"),
    "cross": ("red", "blue", "orange"),
    "hexagon": ("green", "yellow", "purple"),
    "diamond": ("red", "blue", "yellow"),
    "heart": ("green", "purple", "orange"),
}
CONCEPTS: tuple[str, ...] = tuple(
    f"{colour} {shape}"
    for shape in SHAPES
    for colour in COLOURS
    if colour in _CONCEPT_COLOURS[shape]
)

_SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc",),
    "square": ("box",),
    "cross": ("plus sign",),
    "diamond": ("rhombus",),
}
_COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {"purple": ("violet",)}


def _aliases(concept: str) -> tuple[str, ...]:
    """The concept phrase first, then every colour-synonym x shape-synonym combination."""
    colour, shape = concept.split(" ", 1)
    colours = (colour, *_COLOUR_SYNONYMS.get(colour, ()))
    shapes = (shape, *_SHAPE_SYNONYMS.get(shape, ()))
    return tuple(f"{c} {s}" for c in colours for s in shapes)


ALIASES: dict[str, tuple[str, ...]] = {concept: _aliases(concept) for concept in CONCEPTS}

COLOUR_WORDS: tuple[str, ...] = COLOURS + tuple(w for ws in _COLOUR_SYNONYMS.values() for w in ws)
SHAPE_WORDS: tuple[str, ...] = SHAPES + tuple(w for ws in _SHAPE_SYNONYMS.values() for w in ws)
# Every "COLOUR SHAPE" phrase over all colour and shape words (the concepts and their aliases
# among them): with context sentences for each, concept retrieval ranks among all 84, not 24.
VOCABULARY: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPE_WORDS for c in COLOUR_WORDS)


def concept_rows(source: str) -> list[dict]:
    """One ``concepts`` row per concept: its word, its aliases (the word first) and the word's
    Zipf frequency in English (wordfreq's estimate for the two-word phrase)."""
    from wordfreq import zipf_frequency  # imported here: only the concepts table needs it

    return [
        {
            "concept": concept,
            "word": concept,
            "aliases": list(ALIASES[concept]),
            "frequency": zipf_frequency(concept, "en"),
            "polysemy": None,
            "source": source,
        }
        for concept in CONCEPTS
    ]
