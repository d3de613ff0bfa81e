"""Realistic inputs for the extraction benchmark: photo-sized JPEGs and caption-length text.

Throughput depends on what the bytes look like, not on what they depict: decoding cost grows with
pixel count and entropy, text cost with token count. So the images are COCO-sized (most sides
480 to 640) JPEGs of smooth colour fields with sensor-like noise, about 60 to 120 kB each like
real photos, and captions follow COCO's word-count distribution (median about 10 words, a tail
past 25). A few hundred distinct files are repeated under distinct item ids; that keeps the
set-up quick without making decoding any cheaper.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from vlray.items import items_table

# (height, width) of COCO's most common image sizes.
PHOTO_SIZES = ((480, 640), (640, 480), (427, 640), (375, 500), (640, 427), (512, 640))

WORDS = (
    "a an the man woman person child dog cat bus train car plate table pizza kitchen street "
    "sitting standing next to on of with in near holding riding two three small large white "
    "black red blue green yellow brown wooden old young group people field grass water sky "
    "building city road sign traffic light bike motorcycle horse sheep cow bird tree snow "
    "beach ocean wave surfboard skateboard tennis racket ball player game court frisbee kite "
    "flying air playing looking at down up front back side open closed empty full food "
    "sandwich banana apple orange bowl cup glass bottle laptop computer phone desk room bed "
    "couch chair window door wall floor clock vase flowers umbrella rain parked busy"
).split()


def photo_jpegs(count: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``count`` distinct photo-like JPEGs in COCO's common sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        # Smooth colour fields (upsampled coarse noise) plus fine noise: photo-like entropy.
        coarse = rng.uniform(0, 255, size=(h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
        field = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 10, size=(h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=quality
        )
        out.append(buf.getvalue())
    return out


def captions(count: int, seed: int = 0) -> list[str]:
    """``count`` captions with COCO's word-count distribution (8 to 40 words, median ~10)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(10.5), 0.3, size=count)), 8, 40).astype(int)
    vocab = np.array(WORDS)
    return [" ".join(rng.choice(vocab, size=k)).capitalize() + "." for k in lengths]


def image_items(n: int, distinct: int = 256, seed: int = 0) -> pa.Table:
    """An items table of ``n`` image items cycling through ``distinct`` photo JPEGs."""
    jpegs = photo_jpegs(min(n, distinct), seed)
    return items_table(
        [
            {
                "item_id": f"img-{i:07d}",
                "modality": "image",
                "pair_id": f"p{i:07d}",
                "role": "scene",
                "image": jpegs[i % len(jpegs)],
                "source": "bench",
            }
            for i in range(n)
        ]
    )


def text_items(n: int, seed: int = 0) -> pa.Table:
    """An items table of ``n`` caption items."""
    return items_table(
        [
            {
                "item_id": f"txt-{i:07d}",
                "modality": "text",
                "pair_id": f"p{i:07d}",
                "role": "caption",
                "text": text,
                "source": "bench",
            }
            for i, text in enumerate(captions(n, seed))
        ]
    )
