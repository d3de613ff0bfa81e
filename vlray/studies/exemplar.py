"""Exemplar averaging: does representing a concept by the mean of k exemplars raise alignment?

He, Trott & Khosla (2025). Each concept is one row: on the image side the mean of k of its
images, on the text side the mean of k of its in-context word embeddings (word-span pooling;
captions that name the concept when there are no context sentences). k doubles from 1 up to
what every concept has; the side averaged is ``image``, ``text`` or ``both`` (the other side
uses one random exemplar). Each point is ``draws`` random draws: value is their mean and the
interval their percentile range (variability over which exemplars were drawn); the
permutation null (concepts' pairing shuffled: its mean and sd) and p-value are those of the
first draw. Rows:
condition ``k=K/SIDE`` (columns ``k`` and ``averaged_side``).
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from vlray import metrics
from vlray.items import IMAGE, TEXT
from vlray.results import Condition, grid_rows

from .inputs import WORD_SPAN, SmallN, StudyInputs, StudySkipped, layer_labels

SIDES = ("image", "text", "both")

SMALL_N = SmallN(
    10,
    "concepts",
    "with fewer, concept-level scores of unrelated data sit far above 0",
)


def _members(ids: list, concepts: list, index: dict) -> dict[str, np.ndarray]:
    out: dict[str, list[int]] = {}
    for item, concept in zip(ids, concepts, strict=True):
        if concept is not None and item in index:
            out.setdefault(concept, []).append(index[item])
    return {c: np.array(rows) for c, rows in out.items()}


def concept_members(inputs: StudyInputs, text_role: str) -> tuple:
    """(vision stack, language stack, concept -> image rows, concept -> text rows); the text
    side is the concept's captions (``text_role="caption"``) or in-context words
    (``"context"``, word-span pooling)."""
    items = inputs.items.filter(pc.field("concept").is_valid())
    images = items.filter(
        (pc.field("modality") == IMAGE) & pc.field("role").isin(list(inputs.options.image_roles))
    )
    role = "context" if text_role == "context" else "caption"
    contexts = items.filter((pc.field("modality") == TEXT) & (pc.field("role") == role))
    if contexts.num_rows == 0:
        what = "in-context sentences" if role == "context" else "captions"
        raise StudySkipped(f"dataset '{inputs.dataset}' has no {what} with a concept")
    v = inputs.stack("vision")
    t = inputs.stack("language", pooling=WORD_SPAN if role == "context" else None)
    index_v = {item: r for r, item in enumerate(v.item_ids)}
    index_t = {item: r for r, item in enumerate(t.item_ids)}
    img = _members(images["item_id"].to_pylist(), images["concept"].to_pylist(), index_v)
    txt = _members(contexts["item_id"].to_pylist(), contexts["concept"].to_pylist(), index_t)
    return v, t, img, txt


def _weights(groups: list[np.ndarray], k: int, n_rows: int, rng: np.random.Generator):
    """A (concepts x rows) averaging matrix: k rows drawn without replacement per concept."""
    w = np.zeros((len(groups), n_rows))
    for c, rows in enumerate(groups):
        w[c, rng.choice(rows, size=k, replace=False)] = 1.0 / k
    return w


def run(inputs: StudyInputs, run_id: str) -> list[dict]:
    options, own = inputs.options, inputs.options.exemplar
    try:
        v, t, img, txt = concept_members(inputs, own.text)
    except StudySkipped:
        if own.text != "caption":
            raise
        txt = {}
    if not txt and own.text == "caption":  # a concept-level dataset: its words in context
        v, t, img, txt = concept_members(inputs, "context")
    concepts = sorted(set(img) & set(txt))
    if len(concepts) < 4:
        raise StudySkipped(
            f"dataset '{inputs.dataset}': {len(concepts)} concept(s) with both images and "
            "texts; exemplar averaging needs at least 4"
        )
    img_groups, txt_groups = [img[c] for c in concepts], [txt[c] for c in concepts]
    most = {"image": min(map(len, img_groups)), "text": min(map(len, txt_groups))}
    most["both"] = min(most.values())
    alpha = (1.0 - options.confidence) / 2
    where = inputs.where("exemplar", run_id)
    v_layers = [m.astype(np.float64) for m in v.layers]
    t_layers = [m.astype(np.float64) for m in t.layers]
    labels = layer_labels(v), layer_labels(t)

    def score(metric: str) -> list[dict]:
        rows = []
        kw = options.metric_kw(metric)
        done: dict[tuple[int, int], metrics.GridStats] = {}
        for side in SIDES:
            top = min(most[side], own.max_k or most[side])
            for k in [2**e for e in range(int(np.log2(top)) + 1)]:
                k_img = k if side in ("image", "both") else 1
                k_txt = k if side in ("text", "both") else 1
                key = (k_img, k_txt)
                if key not in done:  # k = 1 is the same point on every side: the curves meet
                    done[key] = _point(
                        v_layers,
                        t_layers,
                        img_groups,
                        txt_groups,
                        key,
                        metric,
                        kw,
                        labels,
                        options,
                        own.draws,
                        alpha,
                    )
                stats = done[key]
                condition = Condition(k=k, averaged_side=side)
                rows += grid_rows(stats, metric=metric, condition=condition, **where)
        return rows

    # Concept-level scores: n is the number of concepts; intervals come from the draws.
    return inputs.per_metric(own.metrics or options.metrics, len(concepts), 0, score)


def _point(
    v_layers, t_layers, img_groups, txt_groups, key, metric, kw, labels, options, n_draws, alpha
) -> metrics.GridStats:
    """One point of the curve: ``n_draws`` draws of (k_img, k_txt) exemplars per concept."""
    k_img, k_txt = key
    rng = np.random.default_rng([options.seed, 13, k_img, k_txt])
    n_img, n_txt = len(v_layers[0]), len(t_layers[0])
    draws, first = [], None
    for _ in range(n_draws):
        wi = _weights(img_groups, k_img, n_img, rng)
        wt = _weights(txt_groups, k_txt, n_txt, rng)
        xs, ys = [wi @ m for m in v_layers], [wt @ m for m in t_layers]
        first = first or (xs, ys)
        draws.append(metrics.grid(xs, ys, metric, labels_x=labels[0], labels_y=labels[1], **kw))
    own = options.exemplar
    null = metrics.grid_stats(
        *first,
        metric,
        n_permutations=options.permutations if own.permutations is None else own.permutations,
        seed=options.seed,
        labels_x=labels[0],
        labels_y=labels[1],
        **kw,
    )
    draws = np.stack(draws)
    low, high = np.quantile(draws, [alpha, 1.0 - alpha], axis=0)
    return metrics.GridStats(
        value=draws.mean(axis=0),
        ci_low=low,
        ci_high=high,
        null_mean=null.null_mean,
        null_sd=null.null_sd,
        p_value=null.p_value,
        n=len(img_groups),
    )
