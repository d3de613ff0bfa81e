"""Stage 1 of extraction, on CPU tasks: each item's model input, or why it has none.

An image is read, then decoded, converted and resized to the model's input here, or (for
nvJPEG on the actor's GPU) only checked and passed on encoded; a text is tokenised, with its
target word's token range. A row that fails keeps its place with ``error_stage`` and
``error_reason`` set, and the embed stage turns it into a quarantine record.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from vlray import images
from vlray.catalog import ModelSpec


def decode_batch(
    batch: pa.Table,
    size: int,
    resize: int,
    interpolation: str,
    root: str | None,
    on_device: bool = False,
    cpu_share: float = 0.0,
) -> pa.Table:
    """Read each image; decode, convert and resize it here (``pixels``: raw ``size x size x 3``
    uint8 bytes), or when ``on_device`` and nvJPEG decodes it exactly, only check its header
    and pass the encoded bytes on (``image``) for the GPU. With ``cpu_share``, that fraction of
    the rows (spread evenly) is decoded here all the same, to take load off the GPU. Failures
    become error rows."""
    n = batch.num_rows
    pixels: list[bytes | None] = [None] * n
    encoded: list[bytes | None] = [None] * n
    stage = [""] * n
    reason = [""] * n
    data = batch.column("image").to_pylist()
    paths = batch.column("image_path").to_pylist()
    for i in range(n):
        try:
            raw = data[i]
            if raw is None:
                stage[i] = "read"
                raw = images.read_image_bytes(paths[i], root)
            stage[i] = "decode"
            to_cpu = int((i + 1) * cpu_share) > int(i * cpu_share)
            if on_device and not to_cpu and images.device_decodable(raw, interpolation):
                encoded[i] = raw
            else:
                img = images.decode_image(raw)
                pixels[i] = images.to_model_input(
                    img, size, resize=resize, interpolation=interpolation
                ).tobytes()
            stage[i] = ""
        except images.ImageError as err:
            reason[i] = str(err)
    # Explicit Arrow types: a column of all-null bytes would otherwise lose its type.
    return pa.table(
        {
            "item_id": batch.column("item_id"),
            "perturbation": batch.column("perturbation"),
            "source": pa.array(
                [
                    s or p or ""
                    for s, p in zip(batch.column("source").to_pylist(), paths, strict=True)
                ],
                pa.string(),
            ),
            "image": pa.array(encoded, pa.binary()),
            "pixels": pa.array(pixels, pa.binary()),
            "on_device": pa.array([e is not None for e in encoded], pa.bool_()),
            "error_stage": pa.array(stage, pa.string()),
            "error_reason": pa.array(reason, pa.string()),
        }
    )


@functools.cache
def _tokenizer(spec_json: str):
    from vlray.models import load_tokenizer

    return load_tokenizer(ModelSpec.model_validate_json(spec_json))


def tokenize_batch(batch: pa.Table, spec_json: str) -> pa.Table:
    """Token ids (and the target word's token range) for each text; rows whose word is not
    usable become error rows. Runs as CPU tasks, so a GPU never waits on tokenisation."""
    from vlray.models import tokenize

    spec = ModelSpec.model_validate_json(spec_json)
    texts = batch.column("text").to_pylist()
    tokens, errors = tokenize(
        _tokenizer(spec_json), texts, batch.column("word").to_pylist(), spec.max_length
    )
    lengths = np.array([len(x) for x in tokens.ids], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(tokens.ids) if tokens.ids else np.zeros(0, np.int32)
    stage = ["validate" if i in errors else "" for i in range(len(texts))]
    return pa.table(
        {
            "item_id": batch.column("item_id"),
            "perturbation": batch.column("perturbation"),
            "source": batch.column("source").fill_null(""),
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            "span_start": pa.array(tokens.spans[:, 0]),
            "span_end": pa.array(tokens.spans[:, 1]),
            "error_stage": pa.array(stage, pa.string()),
            "error_reason": pa.array([errors.get(i, "") for i in range(len(texts))]),
        }
    )
