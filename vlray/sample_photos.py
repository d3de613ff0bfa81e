"""A folder of real photos with captions, in the layout ``vlray extract --manifest`` reads:
scikit-image's sample photos (installed with vlray, no download), one caption each, and a few
bad rows (a missing file, a truncated JPEG, a file that is not an image, an empty caption),
to try the bring-your-own-data path on before pointing it at your own folder.

    python -m vlray.sample_photos my-photos     # writes my-photos/img/*.png, my-photos/pairs.csv
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
from pathlib import Path

import skimage
from PIL import Image

# file in skimage/data -> (concept, caption): what each photo shows.
PHOTOS = {
    "astronaut.png": ("person", "an astronaut in a white suit"),
    "brick.png": ("texture", "a wall of grey bricks"),
    "camera.png": ("person", "a man with a camera on a tripod"),
    "chelsea.png": ("animal", "an orange tabby cat"),
    "coffee.png": ("object", "a cup of coffee on a saucer"),
    "coins.png": ("object", "old coins on a dark background"),
    "grass.png": ("texture", "blades of green grass"),
    "gravel.png": ("texture", "a patch of grey gravel"),
    "horse.png": ("animal", "the silhouette of a horse"),
    "hubble_deep_field.jpg": ("sky", "galaxies in deep space"),
    "moon.png": ("sky", "the surface of the moon"),
    "motorcycle_left.png": ("object", "a red motorcycle in a garage"),
    "page.png": ("text", "a page of printed text"),
    "rocket.jpg": ("object", "a rocket on its launch pad"),
    "text.png": ("text", "handwritten and printed words"),
    "retina.jpg": ("medical", "a photo of a human retina"),
    "ihc.png": ("medical", "stained cells under a microscope"),
    "cell.png": ("medical", "a cell under a microscope"),
    "clock_motion.png": ("object", "a clock blurred by motion"),
    "color.png": ("object", "colour patches on a chart"),
}


def write(out: str | Path) -> Path:
    """Write the photos, the bad rows and ``pairs.csv``; returns the manifest's path."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    data = Path(skimage.__file__).parent / "data"
    rows = []
    for name, (concept, caption) in PHOTOS.items():
        stem = Path(name).stem
        target = out / "img" / f"{stem}.png"
        if Path(name).suffix == ".png":
            shutil.copyfile(data / name, target)
        else:
            Image.open(data / name).save(target)
        rows.append([stem, f"img/{stem}.png", caption, concept])
    # Bad rows: the extract quarantines each with its reason and embeds the rest.
    jpeg = io.BytesIO()
    Image.open(data / "chelsea.png").convert("RGB").save(jpeg, "JPEG")
    (out / "img" / "truncated.jpg").write_bytes(jpeg.getvalue()[:2000])
    (out / "img" / "notes.png").write_text("not an image\n")
    rows += [
        ["missing", "img/missing.png", "a photo that was never copied", "object"],
        ["truncated", "img/truncated.jpg", "a cat, cut off half way", "animal"],
        ["not-an-image", "img/notes.png", "a text file named like a picture", "object"],
        ["no-caption", "img/coins.png", "  ", "object"],
    ]
    manifest = out / "pairs.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "image", "caption", "concept"])
        writer.writerows(rows)
    return manifest


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "my-photos"
    path = write(target)
    print(f"wrote {len(PHOTOS)} photos and 4 bad rows: {path}")
