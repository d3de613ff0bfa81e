"""Perturbations: does alignment survive appearance-only changes and fall under semantic ones?

He, Trott & Khosla (2025): perturbed images are scored against their original captions, and
original images against perturbed captions, next to the unperturbed score on the same items.
Rows (condition ``none`` or ``FAMILY/NAME``, column ``perturbation``): every layer pair's
score. The drop (unperturbed minus perturbed, metric ``M_drop``, column ``drop_of`` naming
``M``) is taken at the layer pair where the unperturbed score peaks, for each perturbation and
pooled per family (condition ``FAMILY``: ``perturbation`` null, ``perturbation_family`` set),
with a paired bootstrap interval: both scores are recomputed on the same item resamples, so the
interval is that of the difference, not of two independent scores. A text perturbation that
only some captions have (a role swap needs a caption that states a relation) is compared with
the mean of the same captions unperturbed, so the drop is the perturbation's alone and not
that of a different set of captions.
"""

from __future__ import annotations

import numpy as np

from vlray import metrics
from vlray.embeddings import LayerStack
from vlray.items import NO_PERTURBATION, PERTURBATION_FAMILIES, perturbation_family
from vlray.results import Condition, Metric, score_row

from .inputs import SmallN, StudyInputs, StudySkipped, layer_labels, subset

# Lower than the layerwise minimum: a drop is a paired difference on the same items, so most
# of the sampling noise cancels (the demo's 64 scenes resolve drops of 0.05).
SMALL_N = SmallN(
    50,
    "items",
    "with fewer, a drop's bootstrap interval is usually wider than the drop itself",
)


def _condition(name: str) -> Condition:
    """The condition of a perturbation's rows (``none``: the unperturbed grid)."""
    if name == NO_PERTURBATION:
        return Condition(perturbation=name)
    return Condition(perturbation=name, perturbation_family=perturbation_family(name))


def _common(pairs: dict[str, tuple[LayerStack, LayerStack]]) -> dict:
    """Every pairing restricted to the images all of them have, in one order."""
    shared = set.intersection(*(set(v.item_ids) for v, _ in pairs.values()))
    out = {}
    for name, (v, t) in pairs.items():
        keep = np.array([i for i, item in enumerate(v.item_ids) if item in shared], dtype=np.int64)
        keep = keep[np.argsort(v.item_ids[keep], kind="stable")]
        out[name] = (subset(v, keep), subset(t, keep))
    return out


def run(inputs: StudyInputs, run_id: str) -> list[dict]:
    options = inputs.options
    own = options.perturbation
    image_side = [p for p in inputs.perturbations("vision") if p.startswith("image_")]
    text_side = [p for p in inputs.perturbations("language") if p.startswith("text_")]
    if not image_side and not text_side:
        raise StudySkipped(
            f"dataset '{inputs.dataset}' has no perturbed partitions for "
            f"'{inputs.vision.name}' or '{inputs.language.name}'"
        )
    pairs = {NO_PERTURBATION: inputs.pairs()}
    pairs |= {p: inputs.pairs(image_perturbation=p) for p in image_side}
    pairs |= {p: inputs.pairs(text_perturbation=p) for p in text_side}
    # A text perturbation that only some captions have gets a like-for-like baseline: the same
    # captions, unperturbed (the stacks are loaded: these pairings read nothing more).
    every = set(inputs.pairing().caption_ids)
    partial = [
        p for p in text_side if set(inputs.pairing(text_perturbation=p).caption_ids) != every
    ]
    baselines = {(p, "baseline"): inputs.pairs(captions_of=p) for p in partial}
    common = _common({**pairs, **baselines})
    pairs = {name: common[name] for name in pairs}
    baselines = {p: common[(p, "baseline")][1] for p in partial}
    v0, t0 = pairs[NO_PERTURBATION]
    n = len(v0.item_ids)
    if n < 3:
        raise StudySkipped(f"only {n} item(s) have every perturbation")
    where = inputs.where("perturbation", run_id)
    n_boot = options.bootstrap if own.bootstrap is None else own.bootstrap
    alpha = (1.0 - options.confidence) / 2

    def score(metric: str) -> list[dict]:
        rows = []
        kw = options.metric_kw(metric)
        values = {
            name: metrics.grid(
                v.layers, t.layers, metric, labels_x=layer_labels(v), labels_y=layer_labels(t), **kw
            )
            for name, (v, t) in pairs.items()
        }
        for name, grid in values.items():
            rows += [
                score_row(
                    **where,
                    vision_layer=i,
                    language_layer=j,
                    metric=metric,
                    condition=_condition(name),
                    value=grid[i, j],
                    n=n,
                )
                for i in range(grid.shape[0])
                for j in range(grid.shape[1])
            ]
        # The drop where the unperturbed alignment peaks: a paired bootstrap per perturbation.
        i, j = np.unravel_index(np.argmax(values[NO_PERTURBATION]), values[NO_PERTURBATION].shape)
        drops: dict[str, np.ndarray] = {}
        bases: dict[str, float] = {}  # each perturbation's unperturbed score at (i, j)
        for name, (v, t) in pairs.items():
            if name == NO_PERTURBATION:
                continue
            image_changed = name in image_side
            t_base = baselines.get(name, t0)
            xs = [v0.layers[i], v.layers[i]] if image_changed else [v0.layers[i]]
            ys = [t0.layers[j]] if image_changed else [t_base.layers[j], t.layers[j]]
            if n_boot:
                reps = metrics.bootstrap_replicates(
                    xs, ys, metric, n_bootstrap=n_boot, seed=options.seed, **kw
                ).reshape(n_boot, 2)
                drops[name] = reps[:, 0] - reps[:, 1]
            else:
                drops[name] = np.empty(0)
            base = (
                values[NO_PERTURBATION][i, j]
                if t_base is t0
                else metrics.grid([v0.layers[i]], [t_base.layers[j]], metric, **kw)[0, 0]
            )
            value = base - values[name][i, j]
            bases[name] = base
            rows.append(
                _drop_row(where, metric, _condition(name), value, drops[name], alpha, n, i, j)
            )
        for family in PERTURBATION_FAMILIES:
            members = [p for p in drops if perturbation_family(p) == family]
            if not members:
                continue
            value = np.mean([bases[p] - values[p][i, j] for p in members])
            reps = np.mean([drops[p] for p in members], axis=0) if n_boot else np.empty(0)
            pooled = Condition(perturbation_family=family)
            rows.append(_drop_row(where, metric, pooled, value, reps, alpha, n, i, j))
        return rows

    return inputs.per_metric(own.metrics or options.metrics, n, n_boot, score)


def _drop_row(where: dict, metric: str, condition: Condition, value, reps, alpha, n, i, j) -> dict:
    """The ``M_drop`` row of a perturbation or a pooled family at layer pair (i, j), with the
    paired-bootstrap interval and p-value of its replicates ``reps`` (none when empty)."""
    stats = {}
    if len(reps):
        low, high = np.quantile(reps, [alpha, 1.0 - alpha])
        # One-sided: how often a resample shows no drop at all.
        stats = {
            "ci_low": low,
            "ci_high": high,
            "p_value": (1.0 + np.sum(reps <= 0)) / (1.0 + len(reps)),
        }
    return score_row(
        **where,
        vision_layer=int(i),
        language_layer=int(j),
        metric=Metric(drop_of=metric),
        condition=condition,
        value=value,
        n=n,
        **stats,
    )
