"""The scene graph: typed objects, relations and scenes, their canonical JSON, and the sampling
of exemplar and scene layouts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from vlray.sources.shapes import geometry
from vlray.sources.shapes.concepts import COLOURS, SHAPES

_MARGIN = 0.06  # keep shapes this far from the border, so a translation always has room
_GAP = 0.03  # minimum gap between scene objects, so relations are unambiguous
_SIZE_RADIUS = {"small": (0.085, 0.115), "large": (0.15, 0.20)}  # scene radii, x image side
_EXEMPLAR_RADIUS = (0.10, 0.30)
_LARGE_FROM = 0.13  # radius (x image side) from which an object is called "large"
_ROTATION = 15.0  # degrees either way: enough variety, every shape stays recognisable


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene, in image pixels rounded to 0.01.

    ``size`` is "large" from a radius of 0.13 x the image side (judged before rounding), else
    "small"; ``rotation`` is in degrees (0 for a circle); ``bbox`` is the drawn shape's tight
    box (x0, y0, x1, y1). ``id`` is the object's index in its original scene.
    """

    id: int
    shape: str
    colour: str
    size: str
    radius: float
    rotation: float
    x: float
    y: float
    bbox: tuple[float, float, float, float]

    @classmethod
    def make(
        cls,
        id: int,
        shape: str,
        colour: str,
        radius: float,
        rotation: float,
        x: float,
        y: float,
        image_size: int,
    ) -> SceneObject:
        """The object with these values rounded, its size word and its box."""
        size = "large" if radius >= _LARGE_FROM * image_size else "small"
        rotation = round(rotation if shape != "circle" else 0.0, 2)
        radius, x, y = round(radius, 2), round(x, 2), round(y, 2)
        box = geometry.bbox(shape, radius, rotation, x, y)
        return cls(id, shape, colour, size, radius, rotation, x, y, box)

    def moved_by(self, dx: int, dy: int) -> SceneObject:
        """The object shifted by (dx, dy) pixels, its box redrawn; size and rotation kept."""
        return self.moved_to(self.x + dx, self.y + dy)

    def moved_to(self, x: float, y: float) -> SceneObject:
        """The object centred on (x, y) (rounded to 0.01), its box redrawn; all else kept."""
        x, y = round(x, 2), round(y, 2)
        return replace(
            self, x=x, y=y, bbox=geometry.bbox(self.shape, self.radius, self.rotation, x, y)
        )

    def polygon(self) -> np.ndarray:
        """The outline in image pixels (not for a circle)."""
        return geometry.polygon(self.shape, self.radius, self.rotation, self.x, self.y)

    def left_of(self, other: SceneObject) -> bool:
        """True if this object's whole box lies left of ``other``'s."""
        return self.bbox[2] < other.bbox[0]

    def above(self, other: SceneObject) -> bool:
        """True if this object's whole box lies above ``other``'s."""
        return self.bbox[3] < other.bbox[1]


def apart(a: SceneObject, b: SceneObject, image_size: int) -> bool:
    """True if the boxes are apart by the minimum gap along at least one axis."""
    gap = _GAP * image_size
    return (
        a.bbox[2] + gap <= b.bbox[0]
        or b.bbox[2] + gap <= a.bbox[0]
        or a.bbox[3] + gap <= b.bbox[1]
        or b.bbox[3] + gap <= a.bbox[1]
    )


@dataclass(frozen=True)
class Relation:
    """Object ``subject`` stands ``predicate`` ("left_of" or "above") object ``object``."""

    subject: int
    predicate: str
    object: int


def relations_of(objects: Sequence[SceneObject]) -> tuple[Relation, ...]:
    """Every pairwise left_of / above that holds between the objects' whole boxes."""
    rels = []
    for a in objects:
        for b in objects:
            if a.left_of(b):
                rels.append(Relation(a.id, "left_of", b.id))
            if a.above(b):
                rels.append(Relation(a.id, "above", b.id))
    return tuple(rels)


@dataclass(frozen=True)
class Effects:
    """Whole-image effects applied after drawing, in this order; None: not applied."""

    brightness: float | None = None  # PIL brightness factor
    blur_radius: float | None = None  # Gaussian blur radius in pixels

    def to_dict(self) -> dict[str, float]:
        """The applied effects by name, as the scene graph's JSON holds them."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Scene:
    """A scene graph: the image side in pixels, the background RGB, the objects and effects.

    Its relations are not stored but follow from the objects' boxes, so an edit of the objects
    can never leave them stale. ``to_json`` is the canonical JSON of an item's ``scene_graph``.
    """

    image_size: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    effects: Effects = field(default_factory=Effects)

    @property
    def relations(self) -> tuple[Relation, ...]:
        """Every pairwise left_of / above that holds between whole boxes."""
        return relations_of(self.objects)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal scenes give equal text."""
        graph = {
            "image_size": self.image_size,
            "background": list(self.background),
            "effects": self.effects.to_dict(),
            "objects": [asdict(o) for o in self.objects],
            "relations": [asdict(r) for r in self.relations],
        }
        return json.dumps(graph, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        """The scene whose ``to_json`` is ``text``; its stored relations are derived again."""
        graph = json.loads(text)
        objects = tuple(SceneObject(**{**o, "bbox": tuple(o["bbox"])}) for o in graph["objects"])
        background = tuple(graph["background"])
        effects = Effects(**graph.get("effects", {}))
        return cls(graph["image_size"], background, objects, effects)


def inside(obj: SceneObject, image_size: int) -> bool:
    """True if the object's whole box lies inside the frame, the margins kept clear."""
    m = _MARGIN * image_size
    x0, y0, x1, y1 = obj.bbox
    return m <= x0 and m <= y0 and x1 <= image_size - m and y1 <= image_size - m


def fitted(obj: SceneObject, image_size: int) -> SceneObject:
    """The object moved the least along each axis (plus 0.01 px against rounding) so that its
    box lies inside the margins; itself if it already does."""
    m, far = _MARGIN * image_size, (1 - _MARGIN) * image_size
    x0, y0, x1, y1 = obj.bbox
    dx = (m - x0 + 0.01 if x0 < m else 0.0) - (x1 - far + 0.01 if x1 > far else 0.0)
    dy = (m - y0 + 0.01 if y0 < m else 0.0) - (y1 - far + 0.01 if y1 > far else 0.0)
    return obj if dx == dy == 0.0 else obj.moved_to(obj.x + dx, obj.y + dy)


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light grey with a slight per-channel tint: a little jitter between images."""
    grey = int(rng.integers(222, 246))
    r, g, b = (int(np.clip(grey + t, 0, 255)) for t in rng.integers(-4, 5, size=3))
    return r, g, b


def _place(
    rng: np.random.Generator, oid: int, shape: str, colour: str, radius: float, image_size: int
) -> SceneObject:
    """Put a shape at a random position with its whole bbox inside the margins."""
    rotation = float(rng.uniform(-_ROTATION, _ROTATION))
    probe = SceneObject.make(oid, shape, colour, radius, rotation, 0.0, 0.0, image_size)
    x0, y0, x1, y1 = probe.bbox
    m = _MARGIN * image_size
    x = rng.uniform(m - x0, image_size - m - x1)
    y = rng.uniform(m - y0, image_size - m - y1)
    return SceneObject.make(oid, shape, colour, radius, rotation, float(x), float(y), image_size)


def exemplar_scene(rng: np.random.Generator, concept: str, image_size: int) -> Scene:
    """One object of ``concept`` ("COLOUR SHAPE") at a random size, turn and place."""
    colour, shape = concept.split(" ", 1)
    background = _background(rng)
    radius = float(rng.uniform(*_EXEMPLAR_RADIUS)) * image_size
    obj = _place(rng, 0, shape, colour, radius, image_size)
    return Scene(image_size, background, (obj,))


def sample_scene(rng: np.random.Generator, image_size: int) -> Scene:
    """2-3 objects with distinct (shape, colour), pairwise apart along x or y."""
    background = _background(rng)
    n = int(rng.integers(2, 4))
    kinds = rng.choice(len(SHAPES) * len(COLOURS), size=n, replace=False)
    while True:  # rejection sampling; a fresh layout if one object finds no room
        objects: list[SceneObject] = []
        for oid, kind in enumerate(kinds):
            shape, colour = SHAPES[kind // len(COLOURS)], COLOURS[kind % len(COLOURS)]
            size = tuple(_SIZE_RADIUS)[int(rng.integers(0, 2))]
            radius = float(rng.uniform(*_SIZE_RADIUS[size])) * image_size
            for _ in range(100):
                obj = _place(rng, oid, shape, colour, radius, image_size)
                if all(apart(obj, o, image_size) for o in objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == n:
            return Scene(image_size, background, tuple(objects))
