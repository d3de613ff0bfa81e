"""Extraction: items -> every layer's embeddings in the lake, with Ray Data.

One Ray Data job per (model, dataset): read the items snapshot, decode and resize images on
CPU tasks, embed on an actor pool (one model per actor, a GPU each when present), and write
through ``EmbeddingSink`` straight into the lake's embeddings table; then one Delta
transaction commits every (dataset, model, perturbation) partition of the job at once. Bad
rows leave the stream as quarantine records with a reason, and the rest of the run completes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, Datasink
from ray.data.expressions import col

from vlray import images
from vlray.catalog import ModelSpec
from vlray.items import IMAGE, TEXT, quarantine_row, quarantine_table
from vlray.lake import TABLES, ItemsFingerprint, Lake, LakeError
from vlray.lake.delta import write_file
from vlray.lake.storage import _one_line

log = logging.getLogger(__name__)

# Rows that leave the embed stage: embeddings, or a quarantine record (stage/reason set).
OUTPUT_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("perturbation", pa.string()),
        ("layer", pa.int16()),
        ("pooling", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),
    ]
)


@dataclass(frozen=True)
class ExtractOptions:
    """How hard to push the hardware. Defaults suit a 2-core laptop and a GPU node alike."""

    batch_size: int = 32
    actors: int = 1
    # Fractional CPUs, so that read, decode and write tasks always find a slot beside the pool
    # (an actor holding every CPU starves them and the job waits forever).
    cpus_per_actor: float = 0.5
    decode_cpus: float = 0.5
    io_cpus: float = 0.25
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    precision: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    torch_threads: int | None = None  # None: every core of the node, on CPU
    # Where JPEGs are decoded: "device" = nvJPEG on the actor's GPU (CPU tasks only check
    # headers), "cpu" = Pillow in CPU tasks; auto = device when the actor has a GPU.
    decode: str = "auto"
    # Batches one actor works on at once: on a GPU, one computes while another is staged or
    # turned into Arrow. None: with a GPU 3 for images and 2 for texts, 1 without.
    concurrent_batches: int | None = None
    # Texts per length bucket inside a batch (less padding). None: 256 without a GPU; with one,
    # up to 4,096, cut where padding is least, about one bucket per `bucket_tokens` tokens.
    bucket_rows: int | None = None
    bucket_tokens: int | None = None  # None: 32,768 with a GPU (one full forward pass), off without
    # Texts per actor call (tokenised in tasks of the same size). None: batch_size without a
    # GPU, at least 4,096 with one: a text is tiny, and a large batch sorts into fuller buckets.
    text_batch_size: int | None = None
    # Items per write task (one Parquet file per layer each): small enough that the last write
    # finishes soon after the model, large enough for files of a few MB.
    items_per_write: int = 1024
    # With device decoding, the share of JPEGs that the CPU tasks decode all the same (spread
    # evenly through each batch), which takes that load off the GPU.
    cpu_decode_share: float = 0.0
    # A local folder where each actor appends one JSON line per batch (start, end, rows):
    # the extraction benchmark's steady-state clock. None: no trace.
    trace_dir: str | None = None


@dataclass
class ModelResult:
    """What one (model, dataset) extraction did, for the end-of-run summary."""

    dataset: str
    model: str
    rows: int = 0
    items: int = 0
    quarantined: int = 0
    partitions: list[str] = field(default_factory=list)
    skipped: bool = False
    seconds: float = 0.0
    commit_seconds: float = 0.0  # quarantine merge, embeddings transaction and manifest rows


# --- Stage 1 (CPU tasks): read and check or decode images; tokenise texts ----------------------


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


# --- Stage 2 (actor pool): embed --------------------------------------------------------------


def _error_rows(ids, perts, sources, stages, reasons) -> dict[str, list]:
    """Quarantine records in the output schema: no layer, no embedding, a stage and reason."""
    return {
        "item_id": list(ids),
        "perturbation": list(perts),
        "layer": [None] * len(ids),
        "pooling": [None] * len(ids),
        "embedding": [None] * len(ids),
        "stage": list(stages),
        "reason": list(reasons),
        "source": list(sources),
    }


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


def _non_finite_rows(pooled) -> dict[int, str]:
    """Batch rows whose embedding has NaN/inf at some layer -> reason."""
    bad: dict[int, str] = {}
    for p in pooled:
        finite = p.finite_rows()
        if finite.all():
            continue
        for r in p.rows[~finite]:
            bad.setdefault(int(r), f"non-finite embedding at layer {p.layer} ({p.pooling})")
    return bad


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
        for row, reason in _non_finite_rows(pooled).items():
            refused[row] = ("embed", reason)
        if refused:
            rows = np.array(sorted(refused), dtype=np.int64)
            pooled = [p.without(rows) for p in pooled]
        errors = pa.Table.from_pydict(
            _error_rows(
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


# --- Stage 3 (write tasks): per-layer Parquet files, committed by the driver afterwards ---


def _layer_runs(table: pa.Table) -> list[tuple[str, int, pa.Table]]:
    """``(perturbation, layer, rows)`` for each run of one block. The embed stage emits a
    block's rows layer by layer, so a block with one perturbation needs no reordering; other
    blocks are put in (perturbation, layer) order with one stable sort on integer keys."""
    n = table.num_rows
    layers = table["layer"].to_numpy().astype(np.int64)
    names = pc.unique(table["perturbation"]).to_pylist()
    code = np.zeros(n, dtype=np.int64)
    for j, name in enumerate(names[1:], start=1):
        code[pc.equal(table["perturbation"], name).to_numpy(zero_copy_only=False)] = j
    key = code * 65536 + layers
    if n > 1 and (key[1:] < key[:-1]).any():
        order = np.argsort(key, kind="stable")
        table, key = table.take(pa.array(order)), key[order]
    bounds = [0, *(np.flatnonzero(key[1:] != key[:-1]) + 1).tolist(), n]
    return [
        (names[key[a] // 65536], int(key[a] % 65536), table.slice(a, b - a))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


class EmbeddingSink(Datasink):
    """Writes each (perturbation, layer) group of its blocks as one Parquet file straight
    into the lake's embeddings table, and returns the files' add actions: nothing is visible
    until ``extract_model`` commits them all in one transaction.

    Rows are grouped without sorting or copying the table: each block's runs of one layer are
    sliced out and the slices of a layer written together (readers order rows by item id).
    Quarantine records leave with the write results, not through files.
    """

    def __init__(
        self,
        lake: Lake,
        dataset: str,
        model: str,
        modality: str,
        run_id: str,
        rows_per_write: int = 200_000,
        count_poolings: tuple[str, ...] | None = None,
    ):
        self.lake = lake
        self.dataset = dataset
        self.model = model
        self.modality = modality
        self.run_id = run_id
        self.rows_per_write = rows_per_write
        # Items are counted as layer-0 rows of these poolings (each item has exactly one of
        # them), so that an item whose rows Ray Data split across write tasks counts once.
        # None: distinct ids per task (exact only if an item's rows stay in one task).
        self.count_poolings = count_poolings
        self.results: list[dict] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict:
        stem = f"{self.run_id}-{ctx.task_idx:05d}"
        groups: dict[tuple[str, int], list[pa.Table]] = defaultdict(list)
        errors: list[pa.Table] = []
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if table.num_rows == 0:
                continue
            is_error = pc.is_valid(table["stage"])
            if pc.any(is_error).as_py():
                errors.append(table.filter(is_error))
                table = table.filter(pc.invert(is_error))
            if table.num_rows:
                for pert, layer, rows in _layer_runs(table):
                    groups[(pert, layer)].append(rows)
        counts: dict[str, int] = defaultdict(int)
        items: dict[str, int] = defaultdict(int)
        adds = []
        for (pert, layer), parts in sorted(groups.items()):
            part = pa.concat_tables(parts)
            out = pa.table(
                {
                    "item_id": part["item_id"],
                    "modality": pa.array([self.modality] * part.num_rows, pa.string()),
                    "pooling": part["pooling"],
                    "embedding": part["embedding"],
                }
            )
            partition = {
                "dataset": self.dataset,
                "model": self.model,
                "perturbation": pert,
                "layer": layer,
            }
            # Float embeddings barely compress (a few per cent); writing them plain keeps the
            # writers ahead of a GPU. Ids and names are dictionary-encoded either way.
            adds.append(
                write_file(self.lake.storage, TABLES["embeddings"], out, partition, stem, "none")
            )
            counts[pert] += out.num_rows
            if layer == 0 and self.count_poolings:
                wanted = pc.is_in(part["pooling"], pa.array(self.count_poolings, pa.string()))
                items[pert] += int(pc.sum(wanted).as_py() or 0)
            elif layer == 0:
                items[pert] += len(pc.unique(part["item_id"]))
        quarantined = (
            pa.concat_tables(errors).select(
                ["item_id", "perturbation", "stage", "reason", "source"]
            )
            if errors
            else None
        )
        return {
            "rows": dict(counts),
            "items": dict(items),
            "adds": adds,
            "quarantine": quarantined,
        }

    def on_write_complete(self, write_result) -> None:
        self.results = list(write_result.write_returns)


# --- The job -------------------------------------------------------------------------------


def _gpus(options: ExtractOptions) -> float:
    if options.gpus_per_actor is not None:
        return options.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def embed_batch_size(options: ExtractOptions, modality: str, gpus: float) -> int:
    """Items per actor call: ``batch_size``; for texts on a GPU ``text_batch_size`` (auto: at
    least 4,096)."""
    if modality != TEXT:
        return options.batch_size
    if options.text_batch_size:
        return options.text_batch_size
    return max(options.batch_size, 4096) if gpus > 0 else options.batch_size


def build_dataset(
    lake: Lake,
    dataset: str,
    spec: ModelSpec,
    perturbations: list[str],
    options: ExtractOptions,
    root: str | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Data pipeline for one (model, dataset): read -> decode -> embed."""
    modality = IMAGE if spec.modality == "vision" else TEXT
    columns = ["item_id", "modality", "perturbation", "source"] + (
        ["image", "image_path"] if modality == IMAGE else ["text", "word"]
    )
    # Items sit in many part files, so read, decode, embed and write overlap as a stream.
    # The files of the items snapshot, as the Delta log lists them (never a directory glob:
    # files of a killed or concurrent run may lie beside them).
    files, filesystem = lake.item_files(dataset)
    ds = (
        ray.data.read_parquet(
            files, filesystem=filesystem, partitioning=None, num_cpus=options.io_cpus
        )
        .select_columns(columns)
        .filter(expr=(col("modality") == modality) & col("perturbation").is_in(perturbations))
    )
    gpus = _gpus(options)
    embed_batch = embed_batch_size(options, modality, gpus)
    if modality == IMAGE:
        from vlray.models import image_input

        inp = image_input(spec)
        on_device = options.decode == "device" or (options.decode == "auto" and gpus > 0)
        ds = ds.map_batches(
            decode_batch,
            batch_format="pyarrow",
            batch_size=options.batch_size,
            num_cpus=options.decode_cpus,
            fn_kwargs={
                "size": inp.size,
                "resize": inp.resize,
                "interpolation": inp.interpolation,
                "root": root,
                "on_device": on_device,
                "cpu_share": options.cpu_decode_share if on_device else 0.0,
            },
        )
    else:
        ds = ds.map_batches(
            tokenize_batch,
            batch_format="pyarrow",
            batch_size=embed_batch,
            num_cpus=options.decode_cpus,
            fn_kwargs={"spec_json": spec.model_dump_json()},
        )
    # With a GPU, an actor takes several batches at once, each on its own CUDA stream: while
    # one computes, the others are received, decoded or converted to Arrow. Images take three
    # (nvJPEG and the model contend for the GPU, so more batches must be in flight to keep
    # it busy: measured 3,830 against 3,360 images/s with two), texts two.
    concurrent = options.concurrent_batches or ((3 if modality == IMAGE else 2) if gpus else 1)
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "spec": spec.model_dump(),
            "precision": options.precision,
            "torch_threads": options.torch_threads,
            "bucket_rows": options.bucket_rows or (4096 if gpus > 0 else 256),
            "bucket_tokens": options.bucket_tokens or (32768 if gpus > 0 else None),
            "trace_dir": options.trace_dir,
            "warm_batch": embed_batch if gpus > 0 else None,
            "concurrent": concurrent,
        },
        batch_size=embed_batch,
        batch_format="numpy",
        compute=ActorPoolStrategy(
            size=options.actors,
            max_concurrent_calls_per_actor=concurrent,
            enable_true_multi_threading=concurrent > 1,
        ),
        num_cpus=options.cpus_per_actor,
        num_gpus=gpus,
        # Ray Data restarts a dead actor and retries its batches by default (a worker lost
        # mid-extraction does not fail the job); a constructor error still fails fast.
    )


def config_hash(spec: ModelSpec, items_fingerprint: str) -> str:
    return f"{spec.fingerprint()}-{items_fingerprint}"


def partitions_to_compute(
    lake: Lake, dataset: str, spec: ModelSpec, items: ItemsFingerprint
) -> list[str]:
    """The perturbations of ``dataset`` whose partition for ``spec`` is missing or stale: its
    recorded hash is neither that of the model and the partition's own items nor (as lakes
    written before partitions had their own fingerprints record) that of the model and the
    whole, unchanged, dataset."""
    modality = IMAGE if spec.modality == "vision" else TEXT
    done = lake.committed(dataset, spec.name)
    whole = config_hash(spec, items.dataset)
    return [
        p
        for p in items.perturbations(modality)
        if done.get(p) not in (config_hash(spec, items.partitions[(modality, p)]), whole)
    ]


def extract_model(
    lake: Lake,
    dataset: str,
    spec: ModelSpec,
    items: ItemsFingerprint,
    options: ExtractOptions,
    run_id: str,
    root: str | None = None,
) -> ModelResult:
    """Embed one dataset with one model, computing only the partitions that are missing or
    stale (their config hash covers the model spec and the dataset's items)."""
    from vlray.models import layer_names as model_layer_names
    from vlray.models import model_revision

    started = time.time()
    result = ModelResult(dataset=dataset, model=spec.name)
    modality = IMAGE if spec.modality == "vision" else TEXT
    todo = partitions_to_compute(lake, dataset, spec, items)
    if not todo:
        result.skipped = True
        return result
    # options.items_per_write items per write task: writers stream beside the model instead of
    # one large write at the end, the last write ends soon after the model, and each layer's
    # file stays a few MB.
    layer_names = model_layer_names(spec)
    rows_per_item = len(layer_names) * len(spec.pooling)
    sink = EmbeddingSink(
        lake,
        dataset,
        spec.name,
        modality,
        run_id,
        rows_per_write=options.items_per_write * rows_per_item,
        # An item gets the catalog's poolings, or word_span alone (a text with a target word).
        count_poolings=(spec.pooling[0], "word_span"),
    )
    ds = build_dataset(lake, dataset, spec, todo, options, root=root)
    try:
        ds.write_datasink(sink, ray_remote_args={"num_cpus": options.io_cpus})
    except Exception as err:
        lake_error = _lake_error_in(err, lake)
        if lake_error is None:
            raise
        # A write task could not write, or a read task read (disk full, no permission, store
        # unreachable): say that in one line, not through Ray's wrapped traceback. The files
        # written are unreferenced.
        raise LakeError(f"model '{spec.name}': {lake_error}") from err

    rows, n_items, adds, refused = defaultdict(int), defaultdict(int), [], []
    for r in sink.results:
        for p, n in r["rows"].items():
            rows[p] += n
        for p, n in r["items"].items():
            n_items[p] += n
        adds += r["adds"]
        if r["quarantine"] is not None:
            refused.append(r["quarantine"])
    committing = time.time()
    quarantine = _quarantine_rows(refused, dataset, spec.name, modality)
    result.quarantined = quarantine.num_rows
    lake.merge_quarantine(dataset, spec.name, quarantine, todo, run_id)
    # One transaction for every partition of the job; a partition whose items were all
    # quarantined is committed empty (its manifest record says so).
    lake.commit_embeddings(
        dataset,
        spec.name,
        adds,
        [
            {
                "dataset": dataset,
                "model": spec.name,
                "perturbation": pert,
                "model_revision": model_revision(spec),
                "config_hash": config_hash(spec, items.partitions[(modality, pert)]),
                "rows": rows[pert],
                "items": n_items[pert],
                "layers": len(layer_names),
                "layer_names": layer_names,
                "init": spec.init,
                "items_fingerprint": items.partitions[(modality, pert)],
            }
            for pert in todo
        ],
        run_id,
    )
    result.commit_seconds = time.time() - committing
    result.partitions = list(todo)
    result.rows = sum(rows.values())
    result.items = sum(n_items.values())
    result.seconds = time.time() - started
    return result


def _lake_error_in(err: BaseException, lake: Lake | None = None) -> LakeError | None:
    """The LakeError that a Ray task raised, if one is behind ``err`` (Ray wraps it); else,
    as one, an OSError that names ``lake`` (Ray Data's reader failing on the items files)."""
    seen: set[int] = set()
    os_error: OSError | None = None
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        # Ray re-raises a task's error as a RayTaskError subclassing it, with the original
        # (whose message is one line) as its ``cause``.
        if isinstance(e, LakeError) and not isinstance(e, ray.exceptions.RayError):
            return e
        if (
            lake is not None
            and os_error is None
            and isinstance(e, OSError)
            and not isinstance(e, ray.exceptions.RayError)
            and _names_lake(str(e), lake)
        ):
            os_error = e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    if os_error is not None and lake is not None:
        return LakeError(f"cannot read the lake {lake.uri}: {_one_line(os_error)}")
    return None


def _names_lake(text: str, lake: Lake) -> bool:
    """Whether an error message is about the lake's files (its path, or its bucket)."""
    root = lake.storage.root
    return root in text or (
        not lake.storage.is_local and f"bucket '{root.split('/', 1)[0]}'" in text
    )


def _quarantine_rows(refused: list[pa.Table], dataset: str, model: str, modality: str) -> pa.Table:
    rows = []
    for table in refused:
        for r in table.to_pylist():
            # Every row refused during this model's job carries the model's name, so that the
            # per-model bookkeeping (sql/accounting.sql) balances; a bad image therefore
            # appears once per vision model.
            rows.append(
                quarantine_row(
                    dataset=dataset,
                    item_id=r["item_id"],
                    modality=modality,
                    perturbation=r["perturbation"],
                    stage=r["stage"],
                    reason=r["reason"],
                    source=r["source"],
                    model=model,
                )
            )
    return quarantine_table(rows)
