"""Stage 2 of extraction, on an actor pool: ``EmbedActor`` holds one model on its device
(a GPU each when present) and turns batches of stage 1's rows into every layer's pooled
embeddings, one row per (item, layer, pooling) in ``OUTPUT_SCHEMA``, with a quarantine record
for each row it refuses.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa

from vlray import images
from vlray.catalog import ModelSpec
from vlray.extract.quarantine import error_rows, non_finite_rows
from vlray.extract.sink import OUTPUT_SCHEMA


def _embedding_rows(pooled, ids: np.ndarray, perts: np.ndarray) -> pa.Table:
    """One row per (item, layer, pooling); the embedding column built without Python loops,
    and each distinct row selection's ids and perturbations converted to Arrow once."""
    tables = []
    id_array, pert_array = pa.array(ids, pa.string()), pa.array(perts, pa.string())
    selected: dict[bytes, tuple[pa.Array, pa.Array]] = {}
    for p in pooled:
        n, d = p.vectors.shape
        key = np.asarray(p.rows, dtype=np.int64).tobytes()
        if key not in selected:
            index = pa.array(np.asarray(p.rows, dtype=np.int64))
            selected[key] = (id_array.take(index), pert_array.take(index))
        item_ids, item_perts = selected[key]
        flat = pa.array(np.ascontiguousarray(p.vectors, dtype=np.float32).reshape(-1))
        offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
        tables.append(
            pa.table(
                {
                    "item_id": item_ids,
                    "perturbation": item_perts,
                    "layer": pa.array(np.full(n, p.layer, dtype=np.int16)),
                    "pooling": pa.repeat(pa.scalar(p.pooling, pa.string()), n),
                    "embedding": pa.ListArray.from_arrays(offsets, flat),
                    "stage": pa.nulls(n, pa.string()),
                    "reason": pa.nulls(n, pa.string()),
                    "source": pa.nulls(n, pa.string()),
                },
                schema=OUTPUT_SCHEMA,
            )
        )
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()


class EmbedActor:
    """Holds one model on its device; called with batches of decoded images or token ids."""

    def __init__(
        self,
        spec: dict,
        precision: str = "auto",
        torch_threads: int | None = None,
        bucket_rows: int = 256,
        trace_dir: str | None = None,
        bucket_tokens: int | None = None,
        warm_batch: int | None = None,
        concurrent: int = 1,
    ):
        import torch

        from vlray.models import create_model

        if not torch.cuda.is_available():
            # Ray sets OMP threads to the actor's fractional CPU share (1); torch should use
            # the node's cores while read, decode and write tasks mostly wait on it.
            torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        self.spec = ModelSpec(**spec)
        self.model = create_model(self.spec, precision=precision)
        if self.spec.modality == "language":
            self.model.bucket_rows = bucket_rows
            self.model.bucket_tokens = bucket_tokens
        self.trace = f"{trace_dir}/actor-{os.getpid()}.jsonl" if trace_dir else None
        self._laps = threading.local()  # per batch: seconds spent in each phase
        if warm_batch and str(getattr(self.model, "device", "")).startswith("cuda"):
            self._warm_up(warm_batch, concurrent)

    def _warm_up(self, rows: int, concurrent: int) -> None:
        """One throw-away batch of ``rows`` at start-up, so that the first real batches do not
        pay one-time costs: kernel selection, the nvJPEG decoder's creation, and the
        page-locked host buffers the pooled vectors come back through (one per batch in
        flight; allocating a buffer of hundreds of MB takes a good fraction of a second)."""
        import io

        import torch
        from PIL import Image

        from vlray.models import Tokens

        device = self.model.device
        if self.spec.modality == "vision":
            size = self.model.input.size
            pooled = self.model.embed(torch.zeros((rows, size, size, 3), dtype=torch.uint8))
            jpeg = io.BytesIO()
            Image.new("RGB", (64, 48), (90, 120, 200)).save(jpeg, "JPEG")
            images.decode_jpegs([jpeg.getvalue()], device)
        else:
            ids = np.full(16, self.model.pad_id, dtype=np.int32)
            spans = np.full((rows, 2), -1, dtype=np.int32)
            pooled = self.model.embed_tokens(Tokens(ids=[ids] * rows, spans=spans))
        nbytes = sum(p.vectors.nbytes for p in pooled)
        del pooled  # its host buffer goes back to torch's cache of page-locked blocks
        spare = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(concurrent)]
        del spare
        torch.cuda.synchronize()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.time()
        self._laps.last, self._laps.seconds = started, {}
        out = self._call(batch)
        if self.trace:
            self._lap("arrow")
            record = {"start": started, "end": time.time(), "rows": len(out), **self._laps.seconds}
            with open(self.trace, "a") as f:
                f.write(json.dumps(record) + "\n")
        return out

    def _lap(self, phase: str) -> None:
        """Charge the time since the last lap to ``phase`` (the benchmark's breakdown)."""
        now = time.time()
        self._laps.seconds[phase] = self._laps.seconds.get(phase, 0.0) + now - self._laps.last
        self._laps.last = now

    def _call(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids, perts, sources = (
            np.asarray(batch[c], dtype=object) for c in ("item_id", "perturbation", "source")
        )
        refused = {  # batch row -> (stage, reason), from the CPU stage
            i: (stage, reason)
            for i, (stage, reason) in enumerate(
                zip(batch["error_stage"], batch["error_reason"], strict=True)
            )
            if stage
        }
        keep = np.array([i for i in range(len(ids)) if i not in refused], dtype=np.int64)
        pooled = self._embed(batch, keep, refused) if len(keep) else []
        for row, reason in non_finite_rows(pooled).items():
            refused[row] = ("embed", reason)
        if refused:
            rows = np.array(sorted(refused), dtype=np.int64)
            pooled = [p.without(rows) for p in pooled]
        errors = pa.Table.from_pydict(
            error_rows(
                ids[list(refused)],
                perts[list(refused)],
                sources[list(refused)],
                [stage for stage, _ in refused.values()],
                [r for _, r in refused.values()],
            ),
            schema=OUTPUT_SCHEMA,
        )
        return pa.concat_tables([_embedding_rows(pooled, ids, perts), errors])

    def _embed(self, batch: dict[str, np.ndarray], keep: np.ndarray, refused: dict) -> list:
        """Embed the kept rows; the results index the whole batch."""
        from vlray.models import Tokens, device_stream

        if self.spec.modality == "vision":
            # Decoding, resizing and the model share this thread's CUDA stream: nothing waits
            # for the device until the pooled vectors come back, and the other batch in flight
            # overlaps on its own stream.
            with device_stream(self.model.device):
                pixels = self._pixels(batch, keep, refused)
                self._lap("input")
                pooled = self.model.embed(pixels)
        else:
            tokens = Tokens(
                ids=[np.asarray(batch["input_ids"][i], dtype=np.int32) for i in keep],
                spans=np.stack([batch["span_start"][keep], batch["span_end"][keep]], axis=1),
            )
            self._lap("input")
            pooled = self.model.embed_tokens(tokens)
        self._lap("model")
        return [replace(p, rows=keep[p.rows]) for p in pooled]

    def _pixels(self, batch: dict[str, np.ndarray], keep: np.ndarray, refused: dict):
        """Model input for the kept rows: decoded on the CPU stage, or here on the GPU."""
        import torch

        from vlray.models import to_device

        inp = self.model.input
        size = inp.size
        flags = np.asarray(batch["on_device"], dtype=bool)[keep]
        on_gpu, on_cpu = np.flatnonzero(flags), np.flatnonzero(~flags)
        if not len(on_gpu):
            raw = b"".join(batch["pixels"][i] for i in keep)
            return np.frombuffer(raw, dtype=np.uint8).reshape(len(keep), size, size, 3)
        device = self.model.device
        decoded, failed = images.decode_jpegs([batch["image"][keep[j]] for j in on_gpu], device)
        self._lap("decode")
        for k, why in failed.items():
            refused[int(keep[on_gpu[k]])] = ("decode", why)
        pixels = images.resize_decoded(decoded, size, inp.resize, inp.interpolation, device)
        if not len(on_cpu):
            return pixels
        # Some rows were decoded by the CPU stage: one upload, and both parts put in place in
        # channels-first memory (what the model reads).
        raw = bytearray(b"".join(batch["pixels"][keep[j]] for j in on_cpu))
        host = to_device(np.frombuffer(raw, np.uint8).reshape(-1, size, size, 3), device)
        out = torch.empty((len(keep), 3, size, size), dtype=torch.uint8, device=device)
        out[to_device(on_gpu, device)] = pixels.permute(0, 3, 1, 2)
        out[to_device(on_cpu, device)] = host.permute(0, 3, 1, 2)
        return out.permute(0, 2, 3, 1)
