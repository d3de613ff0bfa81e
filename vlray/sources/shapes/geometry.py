"""Shape outlines: every shape but the circle as a unit polygon, placed in pixels, and the tight
box of any shape."""

from __future__ import annotations

import math

import numpy as np


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


def polygon(shape: str, radius: float, rotation: float, x: float, y: float) -> np.ndarray:
    """The outline of ``shape`` (any but "circle") in image pixels: its unit polygon turned by
    ``rotation`` degrees, scaled to ``radius`` and centred on (x, y)."""
    a = math.radians(rotation)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return _UNIT[shape] @ rot.T * radius + np.array([x, y])


def bbox(
    shape: str, radius: float, rotation: float, x: float, y: float
) -> tuple[float, float, float, float]:
    """Tight axis-aligned box (x0, y0, x1, y1) of the drawn shape, rounded to 0.01 px."""
    if shape == "circle":
        lo, hi = np.array([x - radius, y - radius]), np.array([x + radius, y + radius])
    else:
        pts = polygon(shape, radius, rotation, x, y)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
    x0, y0, x1, y1 = (round(float(v), 2) for v in (*lo, *hi))
    return x0, y0, x1, y1
