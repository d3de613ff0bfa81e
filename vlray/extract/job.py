"""The extraction job for one (model, dataset), run by the driver.

It picks the partitions that are missing or stale, builds the Ray Data pipeline through the
three stages (``decode``, ``embed``, ``sink``), and when the writes are done merges the
quarantine records and commits every (dataset, model, perturbation) partition of the job in
one Delta transaction.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import ray
from ray.data import ActorPoolStrategy
from ray.data.expressions import col

from vlray.catalog import ModelSpec
from vlray.extract.decode import decode_batch, tokenize_batch
from vlray.extract.embed import EmbedActor
from vlray.extract.quarantine import quarantine_rows
from vlray.extract.sink import EmbeddingSink
from vlray.items import IMAGE, NO_PERTURBATION, TEXT
from vlray.lake import ItemsFingerprint, Lake, LakeError
from vlray.lake.storage import _one_line
from vlray.options import ExtractOptions


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


def _items_modality(spec: ModelSpec) -> str:
    """The modality of the items a model embeds: images for a vision model, else texts."""
    return IMAGE if spec.modality == "vision" else TEXT


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
    modality = _items_modality(spec)
    columns = ["item_id", "modality", "perturbation", "source"] + (
        ["image", "image_path"] if modality == IMAGE else ["text", "word"]
    )
    # Items sit in many part files, so read, decode, embed and write overlap as a stream.
    # The files of the items snapshot, as the Delta log lists them (never a directory glob:
    # files of a killed or concurrent run may lie beside them).
    files, filesystem = lake.item_files(dataset)
    # On local disk Ray Data's V1 Parquet reader: V2's listing task cost 3-5 s of every model
    # job on 2 cores (ds.stats()) for files the snapshot lists already. On an object store V2,
    # whose reads fail in bounded time when the store stops answering; V1's hung (test_s3).
    ray.data.DataContext.get_current().use_datasource_v2 = not lake.storage.is_local
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
    lake: Lake,
    dataset: str,
    spec: ModelSpec,
    items: ItemsFingerprint,
    options: ExtractOptions | None = None,
) -> list[str]:
    """The perturbations of ``dataset`` whose partition for ``spec`` is missing or stale: its
    recorded hash is neither that of the model and the partition's own items nor (as lakes
    written before partitions had their own fingerprints record) that of the model and the
    whole, unchanged, dataset. A model in ``options.unperturbed_only`` has only ``none``."""
    modality = _items_modality(spec)
    done = lake.committed(dataset, spec.name)
    whole = config_hash(spec, items.dataset)
    wanted = items.perturbations(modality)
    if options is not None and spec.name in options.unperturbed_only:
        wanted = [p for p in wanted if p == NO_PERTURBATION]
    return [
        p
        for p in wanted
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
    modality = _items_modality(spec)
    todo = partitions_to_compute(lake, dataset, spec, items, options)
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
    quarantine = quarantine_rows(refused, dataset, spec.name, modality)
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
