"""Extraction throughput, three ways in one run: model only, vlray's pipeline, a naive loop.

(a) ``model_only``: the bare network on pre-made inputs already on the device, bf16 autocast
    on a GPU, at the best of a few batch sizes: what the hardware can do for this model.
(b) ``pipeline``: vlray's whole extraction (Parquet items with encoded JPEGs or raw captions,
    decode/resize or tokenise, the model, every layer pooled, Parquet written and committed to
    a lake), run through Ray Data exactly as ``vlray extract`` runs it.
(c) ``naive``: the usual per-layer extraction loop: fp32, batch 64, a forward hook per layer
    that copies the whole activation to the host, pooling there.

The pipeline's start-up (Ray workers, model build and load) is a fixed cost that a long run
amortises, so (b) reports the steady rate, from the first batch entering the model to the
last partition committed (writing included), with the whole-run rate and the start-up beside
it. Targets (GPU only): images (b)/(a) >= 0.75 and (b)/(c) >= 3;
text (b)/(a) >= 0.70 and (b)/(c) >= 5.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlray.bench import workload
from vlray.catalog import ModelSpec
from vlray.models import autocast

TARGETS = {
    "image": {"vs_model": 0.75, "vs_naive": 3.0},
    "text": {"vs_model": 0.70, "vs_naive": 5.0},
}


# --- timing helpers ---------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rate(step: Callable[[int], int], device: str, min_seconds: float = 2.0) -> float:
    """Items per second of ``step(i) -> items``, after two warm-up calls, over >= min_seconds."""
    for i in range(2):
        step(i)
    _sync(device)
    done, calls, t0 = 0, 0, time.perf_counter()
    while True:
        done += step(calls)
        calls += 1
        if calls >= 3 and time.perf_counter() - t0 >= min_seconds:
            _sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                return done / elapsed


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class GpuSampler:
    """Samples GPU utilisation and memory in a thread (NVML) while a block runs."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.util: list[int] = []
        self.mem: list[int] = []
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # no NVML (a CPU machine, or nvidia-ml-py missing): nothing to sample
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.util.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self.mem.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self.times.append(time.time())

    def summary(self, start: float | None = None, end: float | None = None) -> dict[str, Any]:
        """Mean utilisation over the samples taken in ``[start, end]`` (all by default: a
        start-up that loads a model would otherwise count as idle GPU time); peak memory
        over the whole run."""
        if not self.util:
            return {}
        t = np.asarray(self.times)
        inside = (t >= (start if start is not None else -np.inf)) & (
            t <= (end if end is not None else np.inf)
        )
        util = np.asarray(self.util)[inside] if inside.any() else np.asarray(self.util)
        return {
            "gpu_util_pct": float(util.mean()),
            "gpu_mem_peak_gib": max(self.mem) / 2**30,
        }


def _naive_row(rate: float, batch: int, device: str) -> dict[str, Any]:
    return {
        "case": "naive",
        "items_per_s": rate,
        "batch": batch,
        "peak_gib": _peak_gib(device),
        "precision": "fp32",
    }


# --- (a) and (c) for images -------------------------------------------------------------------


def _bare_vision_model(spec: ModelSpec, device: str) -> torch.nn.Module:
    import timm

    torch.manual_seed(spec.seed)
    model = timm.create_model(spec.arch or spec.id, pretrained=False, **spec.kwargs)
    model = model.eval().to(device)
    if device.startswith("cuda") and not hasattr(model, "patch_embed"):
        model = model.to(memory_format=torch.channels_last)  # CNNs run faster channels-last
    return model


def model_only_images(
    spec: ModelSpec, device: str, batch_sizes: Sequence[int], seconds: float = 2.0
) -> dict[str, Any]:
    """(a) The bare model on random pre-made inputs on the device, best of ``batch_sizes``."""
    from vlray.models import image_input

    model = _bare_vision_model(spec, device)
    size = image_input(spec).size
    best: dict[str, Any] = {}
    for bs in batch_sizes:
        _reset_peak(device)
        inputs = [torch.randn(bs, 3, size, size, device=device) for _ in range(2)]
        if device.startswith("cuda") and not hasattr(model, "patch_embed"):
            inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]

        @torch.inference_mode()
        def step(i: int, inputs=inputs, bs=bs) -> int:
            with autocast(device, "auto"):  # bf16 on a GPU, fp32 on a CPU
                model(inputs[i % 2])
            return bs

        rate = _rate(step, device, seconds)
        if rate > best.get("items_per_s", 0):
            best = {"items_per_s": rate, "batch": bs, "peak_gib": _peak_gib(device)}
        del inputs
    return {"case": "model_only", **best, "precision": "bf16" if "cuda" in device else "fp32"}


def naive_images(spec: ModelSpec, device: str, batch: int = 64, seconds: float = 2.0) -> dict:
    """(c) fp32, batch 64, hooks that copy every layer's activation to the host, pooled there."""
    from vlray.models import image_input, vision_layer_names

    model = _bare_vision_model(spec, device)
    size = image_input(spec).size
    modules = dict(model.named_modules())
    copies: list[torch.Tensor] = []
    for name in vision_layer_names(spec, model):
        modules[name].register_forward_hook(lambda _m, _i, out: copies.append(out.detach().cpu()))
    x = torch.randn(batch, 3, size, size, device=device)
    _reset_peak(device)

    @torch.inference_mode()
    def step(_i: int) -> int:
        copies.clear()
        model(x)
        for act in copies:  # pooled on the host, one layer at a time
            if act.ndim == 4:
                act.mean(dim=(2, 3)).numpy()
            else:
                act[:, 0].numpy()
                act[:, 1:].mean(dim=1).numpy()
        return batch

    return _naive_row(_rate(step, device, seconds), batch, device)


# --- (a) and (c) for text ---------------------------------------------------------------------


def _bare_language_model(spec: ModelSpec, device: str):
    from vlray.models.weights import hf_model as _hf_model

    return _hf_model(spec).eval().to(device)


def _token_batches(spec: ModelSpec, texts: list[str], batch: int, sort: bool, device: str):
    from vlray.models import load_tokenizer

    tok = load_tokenizer(spec)
    ids = tok(texts, truncation=True, max_length=spec.max_length)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable") if sort else np.arange(len(ids))
    out = []
    for start in range(0, len(order), batch):
        rows = [ids[i] for i in order[start : start + batch]]
        width = max(len(r) for r in rows)
        arr = np.full((len(rows), width), tok.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, r in enumerate(rows):
            arr[j, : len(r)] = r
            mask[j, : len(r)] = 1
        out.append((torch.from_numpy(arr).to(device), torch.from_numpy(mask).to(device)))
    return out


def model_only_text(
    spec: ModelSpec, texts: list[str], device: str, batch_sizes: Sequence[int], seconds: float = 2.0
) -> dict[str, Any]:
    """(a) The bare model on the captions pre-tokenised, length-sorted and on the device."""
    model = _bare_language_model(spec, device)
    best: dict[str, Any] = {}
    for bs in batch_sizes:
        batches = _token_batches(spec, texts, bs, sort=True, device=device)
        _reset_peak(device)

        @torch.inference_mode()
        def step(i: int, batches=batches) -> int:
            ids, mask = batches[i % len(batches)]
            with autocast(device, "auto"):  # bf16 on a GPU, fp32 on a CPU
                model(input_ids=ids, attention_mask=mask)
            return ids.shape[0]

        rate = _rate(step, device, seconds)
        if rate > best.get("items_per_s", 0):
            best = {"items_per_s": rate, "batch": bs, "peak_gib": _peak_gib(device)}
    return {"case": "model_only", **best, "precision": "bf16" if "cuda" in device else "fp32"}


def naive_text(spec: ModelSpec, texts: list[str], device: str, batch: int = 64, seconds=2.0):
    """(c) fp32, batch 64 in dataset order, every hidden state copied to the host and pooled."""
    model = _bare_language_model(spec, device)
    batches = _token_batches(spec, texts, batch, sort=False, device=device)
    _reset_peak(device)

    @torch.inference_mode()
    def step(i: int) -> int:
        ids, mask = batches[i % len(batches)]
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        m = mask.cpu().unsqueeze(-1).float()
        for h in hidden:
            ((h.cpu() * m).sum(1) / m.sum(1)).numpy()
        return ids.shape[0]

    return _naive_row(_rate(step, device, seconds), batch, device)


# --- (b) the pipeline -------------------------------------------------------------------------


def pipeline(spec: ModelSpec, items, options, workdir: str) -> dict:
    """(b) ``extract_model`` end to end over ``items``.

    The steady rate runs from the first batch entering the model to the last partition
    committed (writing included); the whole-run rate also counts the one-time start-up
    (Ray workers, model build and load), which a long run amortises.
    """
    import json

    from vlray.cluster import ensure_ray
    from vlray.extract import embed_batch_size, extract_model
    from vlray.items import quarantine_table
    from vlray.lake import Lake, new_run_id

    ensure_ray()
    n = items.num_rows
    lake = Lake(str(Path(workdir) / f"lake-{spec.name}"))
    trace = Path(workdir) / f"trace-{spec.name}"
    trace.mkdir()
    run_id = new_run_id()
    fingerprint = lake.write_items("bench", items, quarantine_table([]), run_id)
    sampler = GpuSampler()
    with sampler:
        t0 = time.time()
        traced = options.model_copy(update={"trace_dir": str(trace)})
        result = extract_model(lake, "bench", spec, fingerprint, traced, run_id)
        t_end = time.time()
    if result.items != n:
        raise RuntimeError(f"pipeline embedded {result.items} of {n} items")
    batches = [json.loads(line) for f in trace.iterdir() for line in f.read_text().splitlines()]
    t_first = min(b["start"] for b in batches)
    modality = "image" if spec.modality == "vision" else "text"
    gpus = options.gpus_per_actor if options.gpus_per_actor is not None else 0.0
    return {
        "case": "pipeline",
        "items_per_s": n / (t_end - t_first),
        # How much of the steady window the model's actor spent inside a batch: near 100%
        # means the actor is the bottleneck, much less that the stages around it are.
        "actor_busy_pct": 100 * _covered(batches) / (t_end - t_first),
        # Where a batch's time goes inside the actor, summed over batches (seconds).
        # decode: nvJPEG itself; input: the rest of staging the batch (resize, uploads).
        "actor_s": "/".join(
            f"{phase}={sum(b.get(phase, 0.0) for b in batches):.1f}"
            for phase in ("decode", "input", "model", "arrow")
            if phase != "decode" or any(phase in b for b in batches)
        ),
        # From the actor's last batch to the last commit: the writes and commits left over.
        "tail_s": t_end - max(b["end"] for b in batches),
        "whole_run_items_per_s": n / (t_end - t0),
        "startup_s": t_first - t0,
        "batch": embed_batch_size(options, modality, gpus),
        "precision": options.precision,
        # NVML's busy fraction over the steady window only (the start-up is not GPU work).
        **sampler.summary(t_first, t_end),
    }


def _covered(batches: list[dict]) -> float:
    """Seconds covered by the union of the batches' [start, end] intervals."""
    total, reach = 0.0, float("-inf")
    for b in sorted(batches, key=lambda b: b["start"]):
        start, end = max(b["start"], reach), b["end"]
        if end > start:
            total += end - start
            reach = end
    return total


# --- the benchmark ----------------------------------------------------------------------------


def bench_extract(
    spec: ModelSpec,
    n: int,
    device: str,
    batch_sizes: Sequence[int],
    options,
    seconds: float = 2.0,
    workdir: str | None = None,
) -> list[dict[str, Any]]:
    """(a), (b) and (c) for one model, with (b)/(a) and (b)/(c); rows for
    ``vlray.tables.format_table``."""
    modality = "image" if spec.modality == "vision" else "text"
    if modality == "image":
        items = workload.image_items(n)
        rows = [model_only_images(spec, device, batch_sizes, seconds)]
        rows.append(naive_images(spec, device, seconds=seconds))
    else:
        items = workload.text_items(n)
        texts = items.column("text").to_pylist()
        rows = [model_only_text(spec, texts, device, batch_sizes, seconds)]
        rows.append(naive_text(spec, texts, device, seconds=seconds))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the pipeline's actor needs the memory
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        rows.insert(1, pipeline(spec, items, options, tmp))
    model_rate, pipe_rate, naive_rate = (r["items_per_s"] for r in rows)
    on_gpu = device.startswith("cuda")
    for r in rows:
        r.update(model=spec.name, modality=modality, device=_device_name(device), n=n)
    rows[1]["vs_model"] = pipe_rate / model_rate
    rows[1]["vs_naive"] = pipe_rate / naive_rate
    if on_gpu:
        t = TARGETS[modality]
        rows[1]["targets"] = "; ".join(
            f"{k}>={t[k]}: {'met' if rows[1][k] >= t[k] else 'MISSED'}" for k in t
        )
    else:
        rows[1]["targets"] = "none on CPU (figures only)"
    columns = [
        "model",
        "modality",
        "case",
        "items_per_s",
        "whole_run_items_per_s",
        "startup_s",
        "actor_busy_pct",
        "actor_s",
        "tail_s",
        "batch",
        "precision",
        "vs_model",
        "vs_naive",
        "gpu_util_pct",
        "gpu_mem_peak_gib",
        "peak_gib",
        "device",
        "n",
        "targets",
    ]
    return [{c: r.get(c) for c in columns} for r in rows]


def _device_name(device: str) -> str:
    return (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu x{torch.get_num_threads()}"
    )
