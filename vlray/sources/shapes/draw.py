"""Drawing: a scene graph as an RGB image, and that image as PNG bytes."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from vlray.sources.shapes.concepts import COLOUR_RGB
from vlray.sources.shapes.scene import Scene

_SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap antialiasing
_OUTLINE = 0.009  # outline width as a fraction of the image side (at the final size)


def render_scene(scene: Scene | str) -> Image.Image:
    """Draw a scene graph (a ``Scene`` or its JSON) as an RGB image of ``image_size`` pixels."""
    if isinstance(scene, str):
        scene = Scene.from_json(scene)
    size, s = scene.image_size, _SUPERSAMPLE
    im = Image.new("RGB", (size * s, size * s), scene.background)
    draw = ImageDraw.Draw(im)
    width = max(1, round(_OUTLINE * size * s))
    for obj in scene.objects:
        fill = COLOUR_RGB[obj.colour]
        edge = tuple(int(c * 0.55) for c in fill)  # a darker rim keeps yellow visible on grey
        if obj.shape == "circle":
            x, y, r = obj.x * s, obj.y * s, obj.radius * s
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=edge, width=width)
        else:
            pts = [(float(px), float(py)) for px, py in obj.polygon() * s]
            draw.polygon(pts, fill=fill, outline=edge, width=width)
    im = im.reduce(s)
    if scene.effects.brightness is not None:
        im = ImageEnhance.Brightness(im).enhance(scene.effects.brightness)
    if scene.effects.blur_radius is not None:
        im = im.filter(ImageFilter.GaussianBlur(scene.effects.blur_radius))
    return im


def png(im: Image.Image) -> bytes:
    """PNG bytes with no metadata, so equal images give equal bytes."""
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
