"""Paper scale, on paper: what the sharded layerwise study of ``paper.yaml``'s models costs.

For each model: its layers and widths as vlray taps them (the catalog's ``layers: all``: a
timm CNN's stem and four stages, a ViT's blocks, a Hugging Face vision encoder's blocks, a
language model's embeddings and every block), and the bytes of one layer at n items. For the
largest pair and for the whole vision x language grid: the pair's embeddings, the tasks
``vlray.shards.plan_grid`` cuts it into, each task's estimated memory, and the hours on N
workers, extrapolated from a throughput measured by ``vlray bench align`` (seconds per unit
of CKA work, one unit being one multiply-add of the feature-space products). Estimates, not
measurements: they scale a small run's rate linearly, and large products run at a higher
rate per core than small ones, so the hours are an upper bound for CPUs.
"""

from __future__ import annotations

import torch

from vlray.metrics.inputs import resolve_dtype
from vlray.shards import min_memory_per_task, plan_grid

# (modality, widths of the tapped layers), from each model's published configuration.
ARCHITECTURES: dict[str, tuple[str, list[int]]] = {
    "resnet50": ("vision", [64, 256, 512, 1024, 2048]),
    "resnet152": ("vision", [64, 256, 512, 1024, 2048]),
    "vit_base_patch16_224": ("vision", [768] * 12),
    "vit_large_patch16_224": ("vision", [1024] * 24),
    "mae_base": ("vision", [768] * 12),
    "mae_large": ("vision", [1024] * 24),
    "dinov2_small": ("vision", [384] * 12),
    "dinov2_base": ("vision", [768] * 12),
    "dinov2_large": ("vision", [1024] * 24),
    "segformer_b5": ("vision", [64] * 3 + [128] * 6 + [320] * 40 + [512] * 3),
    "bert_base": ("language", [768] * 13),
    "bert_large": ("language", [1024] * 25),
    "gpt2": ("language", [768] * 13),
    "gpt2_xl": ("language", [1600] * 49),
    "opt_125m": ("language", [768] * 13),
    "opt_1_3b": ("language", [2048] * 25),
    "opt_6_7b": ("language", [4096] * 33),
    "opt_30b": ("language", [7168] * 49),
    "llama2_7b": ("language", [4096] * 33),
    "llama2_13b": ("language", [5120] * 41),
    "bloom_560m": ("language", [1024] * 25),
    "bloom_7b1": ("language", [4096] * 31),
    "open_llama_7b": ("language", [4096] * 33),
}


def cka_units(n: int, widths_x: list[int], widths_y: list[int], evaluations: int) -> float:
    """Multiply-adds of feature-space CKA over a grid: per evaluation (the data, each
    resample, each permutation) the cross products ``n * sum(wx) * sum(wy)`` and each
    layer's own ``n * w^2``."""
    cross = n * sum(widths_x) * sum(widths_y)
    own = n * sum(w * w for w in widths_x + widths_y)
    return float(evaluations) * (cross + own)


_CKA = {"method": "features", "center": True, "l2": False, "clamp_quantile": None}


def _itemsize(n: int) -> int:
    return resolve_dtype(None, torch.device("cpu"), n).itemsize


def _tasks(n: int, wx: list[int], wy: list[int], budget: int, workers: int, reps: int) -> tuple:
    """Tasks of one pair's grid (layer reads, sides, null and bootstrap shards) and the
    budget they run under: ``budget``, or the least that holds the pair's widest layer."""
    itemsize = _itemsize(n)
    budget = max(budget, min_memory_per_task(n, wx + wy, "cka", _CKA, itemsize))
    plan = plan_grid(
        n,
        wx,
        wy,
        "cka",
        _CKA,
        n_bootstrap=reps,
        n_permutations=reps,
        memory_per_task=budget,
        workers=workers,
        itemsize=itemsize,
    )
    return plan.tasks(), budget


def paper_scale(
    seconds_per_unit: float,
    *,
    ns: tuple[int, ...] = (5000, 100_000),
    workers: int = 64,
    resamples: int = 100,
    memory_per_task: int = 8 << 30,
) -> list[dict]:
    """One row per model and n, then the largest pair and the whole grid, with estimated
    hours on ``workers`` CPU workers at the measured ``seconds_per_unit``. Each pair runs
    under ``memory_per_task`` (paper.yaml's 8 GiB), or the least that holds its widest layer
    when that is more."""
    rows = []
    gib = 2**30
    for n in ns:
        for name, (modality, widths) in ARCHITECTURES.items():
            rows.append(
                {
                    "what": f"{name} ({modality})",
                    "n": n,
                    "layers x width": f"{len(widths)} x {max(widths):,}",
                    "bytes per layer": f"{n * max(widths) * 4 / 2**20:,.0f} MiB",
                    "embeddings": f"{n * sum(widths) * 4 / gib:,.2f} GiB",
                    "tasks": "",
                    "memory per task": "",
                    f"hours on {workers} CPUs": "",
                }
            )
    vision = [w for m, w in ARCHITECTURES.values() if m == "vision"]
    language = [w for m, w in ARCHITECTURES.values() if m == "language"]
    evaluations = 1 + 2 * resamples
    for n in ns:
        largest = (ARCHITECTURES["dinov2_large"][1], ARCHITECTURES["opt_30b"][1])
        for what, pairs in (
            ("pair dinov2_large x opt_30b", [largest]),
            (
                f"all {len(vision)} x {len(language)} pairs",
                [(v, t) for v in vision for t in language],
            ),
        ):
            tasks, memory, units = 0, 0, 0.0
            for wx, wy in pairs:
                t, m = _tasks(n, wx, wy, memory_per_task, workers, resamples)
                tasks, memory = tasks + t, max(memory, m)
                units += cka_units(n, wx, wy, evaluations)
            # every model once: what the lake holds for this dataset
            models = {id(w): w for pair in pairs for w in pair}.values()
            embeddings = sum(n * sum(w) * 4 for w in models)
            rows.append(
                {
                    "what": what,
                    "n": n,
                    "layers x width": "",
                    "bytes per layer": "",
                    "embeddings": f"{embeddings / gib:,.1f} GiB",
                    "tasks": f"{tasks:,}",
                    "memory per task": f"{memory / gib:,.2f} GiB",
                    f"hours on {workers} CPUs": f"{units * seconds_per_unit / workers / 3600:,.1f}",
                }
            )
    return rows
