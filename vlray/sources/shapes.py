"""The shapes world: vlray's embedded default dataset, rendered procedurally from a seed.

Nothing here touches the network. ``generate`` returns an items table (``ITEMS_SCHEMA``) with

- exemplar images: one coloured shape per image, ``exemplars_per_concept`` per concept;
- scene images: 2-3 non-overlapping shapes, so relations such as "left of" hold exactly;
- captions of every image, from several templates, paired with their image by ``pair_id``;
- in-context sentences that use a concept phrase (``word``) verbatim, and as many for every
  other phrase of ``VOCABULARY`` (concept null): the words concept retrieval ranks among;
- exact perturbations of scene images and scene captions (see ``IMAGE_PERTURBATIONS`` and
  ``TEXT_PERTURBATIONS``), each keeping its original's ``item_id``;
- per scene a near-miss foil (role "foil"): the scene with one object's shape or colour
  changed, as an image and as its first caption.

``world`` returns the same items and the extra tables of a source: ``trials`` (forced choice
between each scene and its foil, both directions) and ``concepts`` (aliases, word frequency).

Every image is drawn from its scene graph (``render_scene``), and every perturbation edits the
scene graph (or the caption's structured description) and draws again, so a perturbed row
differs from its original by exactly the named change. Randomness comes from
``numpy.random.default_rng`` streams derived from ``(seed, kind, index)``: adding scenes does
not change exemplars, and the same seed gives the same bytes.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from vlray.items import IMAGE, TEXT, concepts_table, items_table, trials_table
from vlray.sources._common import check_int

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
)

# Sub-stream tags: each kind of item draws from its own generator, keyed by its index.
_EXEMPLAR, _SCENE, _CONTEXT, _IMAGE_PERTURB, _TEXT_PERTURB = 1, 2, 3, 4, 5
_FOIL, _VOCABULARY, _TRIAL = 6, 7, 8  # added later: new tags, so older rows keep their bytes

_SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap antialiasing
_OUTLINE = 0.009  # outline width as a fraction of the image side (at the final size)
_MARGIN = 0.06  # keep shapes this far from the border, so a translation always has room
_GAP = 0.03  # minimum gap between scene objects, so relations are unambiguous
_SIZE_RADIUS = {"small": (0.085, 0.115), "large": (0.15, 0.20)}  # scene radii, x image side
_EXEMPLAR_RADIUS = (0.10, 0.30)
_LARGE_FROM = 0.13  # radius (x image side) from which an object is called "large"
_ROTATION = 15.0  # degrees either way: enough variety, every shape stays recognisable
_SPLIT_TEST_FRACTION = 0.2

# Backgrounds for the recolour perturbation, all far from the light grey of the originals.
_ALT_BACKGROUNDS = (
    (45, 48, 56),
    (70, 95, 125),
    (190, 215, 240),
    (240, 200, 215),
    (200, 235, 195),
)

# --------------------------------------------------------------------------------------------
# Geometry


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 72, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _regular(n: int, start_deg: float, radii: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """n vertices (alternating over ``radii``), the first at ``start_deg`` (-90 is up)."""
    angles = np.radians(start_deg + np.arange(n) * 360.0 / n)
    r = np.resize(np.array(radii), n)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def _cross(half_width: float) -> np.ndarray:
    """A plus sign: one corner run (top arm to right arm), turned four times by 90 degrees."""
    w = half_width
    quarter = np.array([(w, -1.0), (w, -w), (1.0, -w)])
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])  # clockwise on screen, where y points down
    return np.concatenate([quarter @ np.linalg.matrix_power(turn, k).T for k in range(4)])


def _unit_polygons() -> dict[str, np.ndarray]:
    """Each shape (except the circle) as a polygon centred on its bbox, inside the unit circle."""
    raw = {
        "square": _regular(4, 45.0),
        "triangle": _regular(3, -90.0),
        "star": _regular(10, -90.0, (1.0, 0.42)),
        "cross": _cross(0.3),
        "hexagon": _regular(6, -90.0),
        "diamond": np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], dtype=float),
        "heart": _heart(),
    }
    out = {}
    for shape, pts in raw.items():
        pts = pts - (pts.min(axis=0) + pts.max(axis=0)) / 2.0
        out[shape] = pts / np.linalg.norm(pts, axis=1).max()
    return out


_UNIT = _unit_polygons()


def _points(obj: dict) -> np.ndarray:
    """The object's polygon in image pixels (from its rounded scene-graph values)."""
    a = math.radians(obj["rotation"])
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return _UNIT[obj["shape"]] @ rot.T * obj["radius"] + np.array([obj["x"], obj["y"]])


def _bbox(obj: dict) -> list[float]:
    """Tight axis-aligned box [x0, y0, x1, y1] of the drawn shape."""
    if obj["shape"] == "circle":
        x, y, r = obj["x"], obj["y"], obj["radius"]
        lo, hi = np.array([x - r, y - r]), np.array([x + r, y + r])
    else:
        pts = _points(obj)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
    return [round(float(v), 2) for v in (*lo, *hi)]


def _make_object(
    oid: int,
    shape: str,
    colour: str,
    radius: float,
    rotation: float,
    x: float,
    y: float,
    image_size: int,
) -> dict:
    size = "large" if radius >= _LARGE_FROM * image_size else "small"
    obj = {
        "id": oid,
        "shape": shape,
        "colour": colour,
        "size": size,
        "radius": round(radius, 2),
        "rotation": round(rotation if shape != "circle" else 0.0, 2),
        "x": round(x, 2),
        "y": round(y, 2),
    }
    obj["bbox"] = _bbox(obj)
    return obj


def _place(
    rng: np.random.Generator, oid: int, shape: str, colour: str, radius: float, image_size: int
) -> dict:
    """Put a shape at a random position with its whole bbox inside the margins."""
    rotation = float(rng.uniform(-_ROTATION, _ROTATION))
    probe = _make_object(oid, shape, colour, radius, rotation, 0.0, 0.0, image_size)
    x0, y0, x1, y1 = probe["bbox"]
    m = _MARGIN * image_size
    x = rng.uniform(m - x0, image_size - m - x1)
    y = rng.uniform(m - y0, image_size - m - y1)
    return _make_object(oid, shape, colour, radius, rotation, float(x), float(y), image_size)


def _separated(a: list[float], b: list[float], gap: float) -> bool:
    """True if the boxes are apart by ``gap`` along at least one axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _relations(objects: list[dict]) -> list[dict]:
    """Every pairwise left_of / above that holds between whole bboxes."""
    rels = []
    for a in objects:
        for b in objects:
            if a["bbox"][2] < b["bbox"][0]:
                rels.append({"subject": a["id"], "predicate": "left_of", "object": b["id"]})
            if a["bbox"][3] < b["bbox"][1]:
                rels.append({"subject": a["id"], "predicate": "above", "object": b["id"]})
    return rels


def _graph(
    objects: list[dict], background: tuple[int, ...], image_size: int, effects: dict | None = None
) -> dict:
    return {
        "image_size": image_size,
        "background": list(background),
        "effects": dict(effects or {}),
        "objects": objects,
        "relations": _relations(objects),
    }


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light grey with a slight per-channel tint: a little jitter between images."""
    grey = int(rng.integers(222, 246))
    return tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-4, 5, size=3))


def _exemplar_graph(rng: np.random.Generator, concept: str, image_size: int) -> dict:
    colour, shape = concept.split(" ", 1)
    background = _background(rng)
    radius = float(rng.uniform(*_EXEMPLAR_RADIUS)) * image_size
    obj = _place(rng, 0, shape, colour, radius, image_size)
    return _graph([obj], background, image_size)


def _scene_graph(rng: np.random.Generator, image_size: int) -> dict:
    """2-3 objects with distinct (shape, colour), pairwise separated along x or y."""
    background = _background(rng)
    n = int(rng.integers(2, 4))
    kinds = rng.choice(len(SHAPES) * len(COLOURS), size=n, replace=False)
    gap = _GAP * image_size
    while True:  # rejection sampling; a fresh layout if one object finds no room
        objects: list[dict] = []
        for oid, kind in enumerate(kinds):
            shape, colour = SHAPES[kind // len(COLOURS)], COLOURS[kind % len(COLOURS)]
            size = ("small", "large")[int(rng.integers(0, 2))]
            radius = float(rng.uniform(*_SIZE_RADIUS[size])) * image_size
            for _ in range(100):
                obj = _place(rng, oid, shape, colour, radius, image_size)
                if all(_separated(obj["bbox"], o["bbox"], gap) for o in objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == n:
            return _graph(objects, background, image_size)


# --------------------------------------------------------------------------------------------
# Rendering


def render_scene(scene_graph: dict | str) -> Image.Image:
    """Draw a scene graph (dict or its JSON) as an RGB image of ``image_size`` pixels."""
    graph = json.loads(scene_graph) if isinstance(scene_graph, str) else scene_graph
    size, s = graph["image_size"], _SUPERSAMPLE
    im = Image.new("RGB", (size * s, size * s), tuple(graph["background"]))
    draw = ImageDraw.Draw(im)
    width = max(1, round(_OUTLINE * size * s))
    for obj in graph["objects"]:
        fill = COLOUR_RGB[obj["colour"]]
        edge = tuple(int(c * 0.55) for c in fill)  # a darker rim keeps yellow visible on grey
        if obj["shape"] == "circle":
            x, y, r = obj["x"] * s, obj["y"] * s, obj["radius"] * s
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=edge, width=width)
        else:
            pts = [(float(px), float(py)) for px, py in _points(obj) * s]
            draw.polygon(pts, fill=fill, outline=edge, width=width)
    im = im.reduce(s)
    effects = graph.get("effects", {})
    if "brightness" in effects:
        im = ImageEnhance.Brightness(im).enhance(effects["brightness"])
    if "blur_radius" in effects:
        im = im.filter(ImageFilter.GaussianBlur(effects["blur_radius"]))
    return im


def _png(im: Image.Image) -> bytes:
    """PNG bytes with no metadata, so equal images give equal bytes."""
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _dumps(graph: dict) -> str:
    return json.dumps(graph, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Captions: each template turns a structured description (objects + geometry) into one
# sentence, so a perturbation can change the description and re-render the same template.

_NUMBERS = {1: "One shape", 2: "Two shapes", 3: "Three shapes"}
_REL_WORDS = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _np(obj: dict) -> str:
    return _article(f"{obj['size']} {obj['colour']} {obj['shape']}")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _rel_word(a: dict, b: dict) -> str:
    """How ``a`` stands to ``b``; horizontal first, as the captions read left to right."""
    if a["bbox"][2] < b["bbox"][0]:
        return _REL_WORDS["left_of"]
    if b["bbox"][2] < a["bbox"][0]:
        return _REL_WORDS["right_of"]
    return _REL_WORDS["above"] if a["bbox"][3] < b["bbox"][1] else _REL_WORDS["below"]


def _chain(objects: list[dict]) -> str:
    """ "A X to the left of a Y, which is above a Z." along the given order."""
    text = f"{_cap(_np(objects[0]))} {_rel_word(objects[0], objects[1])} {_np(objects[1])}"
    for a, b in zip(objects[1:], objects[2:], strict=False):
        text += f", which is {_rel_word(a, b)} {_np(b)}"
    return text + "."


def _left_to_right(objects: list[dict]) -> list[dict]:
    return sorted(objects, key=lambda o: (o["x"], o["y"], o["id"]))


def _region(obj: dict, image_size: int) -> str:
    col = ("left", "", "right")[min(2, int(3 * obj["x"] / image_size))]
    row = ("top", "", "bottom")[min(2, int(3 * obj["y"] / image_size))]
    return f"{row} {col}".strip() or "centre"


_Template = Callable[[list[dict], int], str]

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


def _caption_templates(rng: np.random.Generator, n_objects: int, count: int) -> list[str]:
    """Distinct templates for one image; a scene's first caption always states a relation."""
    if n_objects == 1:
        names = list(_SINGLE_TEMPLATES)
        return [names[i] for i in rng.permutation(len(names))[:count]]
    relational, listing = _SCENE_PARAPHRASE_GROUPS
    first = relational[int(rng.integers(0, len(relational)))]
    rest = [t for t in _SCENE_TEMPLATES if t != first]
    return [first] + [rest[i] for i in rng.permutation(len(rest))[: count - 1]]


def _render_caption(template: str, objects: list[dict], image_size: int) -> str:
    table = _SINGLE_TEMPLATES if len(objects) == 1 else _SCENE_TEMPLATES
    return table[template](objects, image_size)


# --------------------------------------------------------------------------------------------
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


def _context_sentence(template: str, concept: str) -> str:
    np_ = _article(concept)
    return template.format(w=concept, np=np_, NP=_cap(np_))


# --------------------------------------------------------------------------------------------
# Perturbations


def _free_colours(objects: list[dict]) -> list[str]:
    used = {o["colour"] for o in objects}
    return [c for c in COLOURS if c not in used]


def _recolour(objects: list[dict], index: int, colour: str) -> list[dict]:
    return [dict(o, colour=colour) if i == index else o for i, o in enumerate(objects)]


def _perturb_graph(name: str, graph: dict, rng: np.random.Generator) -> dict:
    """The scene graph after one named image perturbation; the original is left untouched."""
    size, objects = graph["image_size"], graph["objects"]
    background = graph["background"]
    if name == "image_appearance/background":
        background = _ALT_BACKGROUNDS[int(rng.integers(0, len(_ALT_BACKGROUNDS)))]
        return _graph(objects, background, size)
    if name == "image_appearance/brightness":
        factor = rng.uniform(0.5, 0.7) if rng.integers(0, 2) else rng.uniform(1.3, 1.5)
        return _graph(objects, background, size, {"brightness": round(float(factor), 3)})
    if name == "image_appearance/blur":
        radius = rng.uniform(0.011, 0.016) * size
        return _graph(objects, background, size, {"blur_radius": round(float(radius), 3)})
    if name == "image_appearance/translate":
        return _graph(_translate(objects, rng, size), background, size)
    if name == "image_semantic/remove_object":
        drop = int(rng.integers(0, len(objects)))
        return _graph([o for i, o in enumerate(objects) if i != drop], background, size)
    if name == "image_semantic/swap_attribute":
        index = int(rng.integers(0, len(objects)))
        free = _free_colours(objects)
        colour = free[int(rng.integers(0, len(free)))]
        return _graph(_recolour(objects, index, colour), background, size)
    raise ValueError(f"unknown image perturbation {name!r}")


def _shift(lo_room: float, hi_room: float, rng: np.random.Generator) -> int:
    """A whole-pixel shift of at least 3 px towards a side with room, never out of frame."""
    options = [(-1, lo_room), (1, hi_room)]
    options = [(sign, room) for sign, room in options if room >= 3]
    if not options:
        return 0
    sign, room = options[int(rng.integers(0, len(options)))]
    return sign * int(rng.integers(3, int(room) + 1))


def _translate(objects: list[dict], rng: np.random.Generator, size: int) -> list[dict]:
    """Move the whole layout rigidly, so every relation between objects still holds."""
    boxes = np.array([o["bbox"] for o in objects])
    edge = 1.0
    dx = _shift(boxes[:, 0].min() - edge, size - edge - boxes[:, 2].max(), rng)
    dy = _shift(boxes[:, 1].min() - edge, size - edge - boxes[:, 3].max(), rng)
    moved = []
    for o in objects:
        obj = dict(o, x=round(o["x"] + dx, 2), y=round(o["y"] + dy, 2))
        obj["bbox"] = _bbox(obj)
        moved.append(obj)
    return moved


def _swap_caption_colours(objects: list[dict], rng: np.random.Generator) -> list[dict]:
    """Swap two objects' colours where that changes the meaning, else recolour one object."""
    pairs = [
        (i, j)
        for i in range(len(objects))
        for j in range(i + 1, len(objects))
        if objects[i]["colour"] != objects[j]["colour"]
        and (objects[i]["shape"], objects[i]["size"]) != (objects[j]["shape"], objects[j]["size"])
    ]
    if pairs:
        i, j = pairs[int(rng.integers(0, len(pairs)))]
        swapped = _recolour(objects, i, objects[j]["colour"])
        return _recolour(swapped, j, objects[i]["colour"])
    index = int(rng.integers(0, len(objects)))
    free = _free_colours(objects)
    return _recolour(objects, index, free[int(rng.integers(0, len(free)))])


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


def _paraphrase_template(template: str, siblings: list[str], rng: np.random.Generator) -> str:
    """Another template of the same meaning, preferring one this image's captions do not use."""
    group = next(g for g in _SCENE_PARAPHRASE_GROUPS if template in g)
    others = [t for t in group if t != template]
    unused = [t for t in others if t not in siblings] or others
    return unused[int(rng.integers(0, len(unused)))]


def _perturb_caption(
    name: str,
    template: str,
    siblings: list[str],
    objects: list[dict],
    text: str,
    image_size: int,
    rng: np.random.Generator,
) -> str:
    """One named text perturbation of a scene caption."""
    if name == "text_appearance/case":
        return text.upper()
    if name == "text_appearance/punctuation":
        return text.replace(",", "").replace(":", "").rstrip(".") + "!"
    if name == "text_appearance/paraphrase":
        return _render_caption(_paraphrase_template(template, siblings, rng), objects, image_size)
    if name == "text_semantic/scramble":
        return _scramble(text, rng)
    if name == "text_semantic/swap_attribute":
        return _render_caption(template, _swap_caption_colours(objects, rng), image_size)
    raise ValueError(f"unknown text perturbation {name!r}")


# --------------------------------------------------------------------------------------------
# Foils: near misses for forced choice


def _reshaped(graph: dict, index: int, shape: str) -> list[dict] | None:
    """The objects with object ``index`` drawn as ``shape``, or None where that would move a
    relation, close a gap, leave the frame or repeat another object's (shape, colour)."""
    size, objects = graph["image_size"], graph["objects"]
    o = objects[index]
    if shape == o["shape"] or any(
        (p["shape"], p["colour"]) == (shape, o["colour"]) for p in objects
    ):
        return None
    new = _make_object(
        o["id"], shape, o["colour"], o["radius"], o["rotation"], o["x"], o["y"], size
    )
    others = [p for i, p in enumerate(objects) if i != index]
    if not all(0 <= v <= size for v in new["bbox"]) or new["size"] != o["size"]:
        return None
    if not all(_separated(new["bbox"], p["bbox"], _GAP * size) for p in others):
        return None
    changed = [new if i == index else p for i, p in enumerate(objects)]
    # Same relations, so every caption template reads the same but for the shape word.
    return changed if _relations(changed) == graph["relations"] else None


def _foil_graph(graph: dict, rng: np.random.Generator) -> dict:
    """The scene graph with exactly one object changed in one attribute: half the time its shape
    (where some change keeps the layout's relations), else its colour (to one the scene lacks)."""
    size, objects, background = graph["image_size"], graph["objects"], graph["background"]
    if int(rng.integers(0, 2)) == 0:
        options = [
            changed
            for i in range(len(objects))
            for shape in SHAPES
            if (changed := _reshaped(graph, i, shape)) is not None
        ]
        if options:
            return _graph(options[int(rng.integers(0, len(options)))], background, size)
    index = int(rng.integers(0, len(objects)))
    free = _free_colours(objects)
    return _graph(
        _recolour(objects, index, free[int(rng.integers(0, len(free)))]), background, size
    )


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


def _scene_trials(seed: int, index: int) -> list[dict]:
    """A scene's two trials: its first caption between scene and foil image (text_to_image),
    and the scene image between its first caption and the foil's (image_to_text)."""
    rng = np.random.default_rng([seed, _TRIAL, index])
    scene, split = _scene_id(index), _split_scene(index)
    foil, caption = f"{scene}-foil", f"{scene}#c0"
    return [
        _choice_trial(scene, "text_to_image", caption, (scene, foil), split, rng),
        _choice_trial(scene, "image_to_text", scene, (caption, f"{foil}#c0"), split, rng),
    ]


# --------------------------------------------------------------------------------------------
# Rows


def _slug(concept: str) -> str:
    return concept.replace(" ", "-")


def _split_last(index: int, count: int) -> str:
    """The last ~20% of a concept's items are test: every concept gets the same share."""
    n_test = max(1, round(_SPLIT_TEST_FRACTION * count))
    return "test" if index >= count - n_test else "train"


def _scene_id(index: int) -> str:
    return f"scene-{index:04d}"


def _split_scene(index: int) -> str:
    """Every fifth scene is test, so adding scenes never moves an existing one."""
    return "test" if index % 5 == 4 else "train"


def _image_row(
    item_id: str,
    role: str,
    concept: str | None,
    split: str,
    graph: dict,
    perturbation: str | None = None,
) -> dict:
    return {
        "item_id": item_id,
        "modality": IMAGE,
        "pair_id": item_id,
        "role": role,
        "concept": concept,
        "split": split,
        "image": _png(render_scene(graph)),
        "perturbation": perturbation,
        "scene_graph": _dumps(graph),
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


def _exemplar_rows(
    seed: int, exemplars_per_concept: int, captions_per_image: int, image_size: int
) -> list[dict]:
    rows = []
    for c, concept in enumerate(CONCEPTS):
        for k in range(exemplars_per_concept):
            rng = np.random.default_rng([seed, _EXEMPLAR, c, k])
            graph = _exemplar_graph(rng, concept, image_size)
            item_id = f"ex-{_slug(concept)}-{k:03d}"
            split = _split_last(k, exemplars_per_concept)
            rows.append(_image_row(item_id, "exemplar", concept, split, graph))
            for j, t in enumerate(_caption_templates(rng, 1, captions_per_image)):
                text = _render_caption(t, graph["objects"], image_size)
                rows.append(_caption_row(f"{item_id}#c{j}", item_id, concept, split, text))
    return rows


def _sentence_rows(
    rng: np.random.Generator, prefix: str, phrase: str, concept: str | None, count: int
) -> list[dict]:
    """``count`` context sentences of ``phrase`` from distinct templates, ids PREFIX-SLUG-KK."""
    order = rng.permutation(len(CONTEXT_TEMPLATES))[:count]
    return [
        {
            "item_id": f"{prefix}-{_slug(phrase)}-{k:02d}",
            "modality": TEXT,
            "role": "context",
            "concept": concept,
            "split": _split_last(k, count),
            "text": _context_sentence(CONTEXT_TEMPLATES[t], phrase),
            "word": phrase,
        }
        for k, t in enumerate(order)
    ]


def _context_rows(seed: int, sentences_per_concept: int) -> list[dict]:
    rows = []
    for c, concept in enumerate(CONCEPTS):
        rng = np.random.default_rng([seed, _CONTEXT, c])
        rows += _sentence_rows(rng, "ctx", concept, concept, sentences_per_concept)
    return rows


def _vocabulary_rows(seed: int, sentences_per_concept: int) -> list[dict]:
    """Context sentences of every ``VOCABULARY`` phrase that is no concept, concept null: they
    widen retrieval's candidates but stay out of concept means (which group by concept)."""
    rows = []
    for v, phrase in enumerate(VOCABULARY):
        if phrase not in CONCEPTS:
            rng = np.random.default_rng([seed, _VOCABULARY, v])
            rows += _sentence_rows(rng, "voc", phrase, None, sentences_per_concept)
    return rows


def _concept_rows(source: str) -> list[dict]:
    """One row per concept: its word, its aliases (the word first) and the word's Zipf
    frequency in English (wordfreq's estimate for the two-word phrase)."""
    from wordfreq import zipf_frequency  # imported here: only ``world`` needs it

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


def _foil_rows(seed: int, index: int, graph: dict, template: str, split: str) -> list[dict]:
    """The scene's foil image and its caption from the scene's first caption template."""
    foil = _foil_graph(graph, np.random.default_rng([seed, _FOIL, index]))
    item_id = f"{_scene_id(index)}-foil"
    text = _render_caption(template, foil["objects"], graph["image_size"])
    return [
        _image_row(item_id, "foil", None, split, foil),
        _caption_row(f"{item_id}#c0", item_id, None, split, text, role="foil"),
    ]


def _scene_rows(
    seed: int,
    index: int,
    captions_per_image: int,
    image_size: int,
    perturbations: bool,
    foils: bool = False,
) -> list[dict]:
    rng = np.random.default_rng([seed, _SCENE, index])
    graph = _scene_graph(rng, image_size)
    item_id, split = _scene_id(index), _split_scene(index)
    templates = _caption_templates(rng, len(graph["objects"]), captions_per_image)
    captions = [_render_caption(t, graph["objects"], image_size) for t in templates]
    rows = [_image_row(item_id, "scene", None, split, graph)]
    rows += [
        _caption_row(f"{item_id}#c{j}", item_id, None, split, text)
        for j, text in enumerate(captions)
    ]
    if foils:
        rows += _foil_rows(seed, index, graph, templates[0], split)
    if not perturbations:
        return rows
    for p, name in enumerate(IMAGE_PERTURBATIONS):
        prng = np.random.default_rng([seed, _IMAGE_PERTURB, index, p])
        rows.append(
            _image_row(item_id, "scene", None, split, _perturb_graph(name, graph, prng), name)
        )
    for j, (template, text) in enumerate(zip(templates, captions, strict=True)):
        for p, name in enumerate(TEXT_PERTURBATIONS):
            prng = np.random.default_rng([seed, _TEXT_PERTURB, index, j, p])
            new = _perturb_caption(
                name, template, templates, graph["objects"], text, image_size, prng
            )
            rows.append(_caption_row(f"{item_id}#c{j}", item_id, None, split, new, name))
    return rows


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
            raise ValueError(f"{name} must be True or False, got {flag!r}")

    rows = _exemplar_rows(seed, exemplars_per_concept, captions_per_image, image_size)
    rows += _context_rows(seed, sentences_per_concept)
    if vocabulary:
        rows += _vocabulary_rows(seed, sentences_per_concept)
    trials = []
    for index in range(n_scenes):
        rows += _scene_rows(seed, index, captions_per_image, image_size, perturbations, foils)
        if foils:
            trials += _scene_trials(seed, index)
    source = f"shapes:seed={seed}"
    for row in rows + trials:
        row["source"] = source
    return items_table(rows), trials, source


def generate(
    seed: int = 0,
    n_scenes: int = 64,
    exemplars_per_concept: int = 8,
    captions_per_image: int = 3,
    sentences_per_concept: int = 10,
    image_size: int = 224,
    perturbations: bool = True,
    foils: bool = True,
    vocabulary: bool = True,
) -> pa.Table:
    """Render the shapes world for ``seed`` as an items table (``vlray.items.ITEMS_SCHEMA``).

    Rows: per concept ``exemplars_per_concept`` exemplar images with ``captions_per_image``
    captions each and ``sentences_per_concept`` context sentences; ``n_scenes`` scene images
    with their captions; and, if ``perturbations``, one copy of every scene image per
    ``IMAGE_PERTURBATIONS`` entry and of every scene caption per ``TEXT_PERTURBATIONS`` entry.
    If ``vocabulary``, ``sentences_per_concept`` context sentences (concept null, ids
    ``voc-SLUG-KK``) for every other ``VOCABULARY`` phrase; if ``foils``, per scene a foil image
    ``scene-NNNN-foil`` and its caption ``scene-NNNN-foil#c0`` (role "foil"). Neither flag
    changes the other rows. The same arguments give the same bytes.
    """
    return _build(
        seed,
        n_scenes,
        exemplars_per_concept,
        captions_per_image,
        sentences_per_concept,
        image_size,
        perturbations,
        foils,
        vocabulary,
    )[0]


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

    ``trials`` (``TRIALS_SCHEMA``; only if ``foils``): per scene ``scene-NNNN/text_to_image``
    (query its first caption, choices the scene and foil images) and ``scene-NNNN/image_to_text``
    (query the scene image, choices its first caption and the foil's), choices in a seeded
    order, ``preferred`` the index of the true one, ``label`` 1 for it and 0 for the foil.
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
    tables = {"concepts": concepts_table(_concept_rows(source))}
    if foils:
        tables["trials"] = trials_table(trials)
    return items, tables
