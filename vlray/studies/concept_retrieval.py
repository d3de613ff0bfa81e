"""Concept retrieval (Li, Kementchedjhieva, Fierro & Sogaard, TACL 2024).

Image side: a concept is the mean of its images. Language side: every word of the vocabulary
(each distinct ``word`` of the in-context sentences, so aliases and distractors included) is
the mean of its word-span embeddings over its sentences. Both sides are PCA-reduced to the
smaller width (PCA fitted once on all concepts / the whole vocabulary, without labels), and to
fewer axes than a fold has training concepts, beyond which the rotation is undetermined; an
orthogonal Procrustes map is fitted on the training concepts of each of ``folds`` folds; each
held-out concept is mapped into the language space and the vocabulary ranked by cosine
(``nn``) or CSLS (``csls``). P@k: a hit is any alias of the concept among the top k.

Rows: metric ``p@K`` (column ``top_k``), condition ``nn`` / ``csls`` (column ``retrieval``),
then per breakdown bin (columns ``breakdown``, ``bin``) ``nn/dispersion=low`` (thirds of the
mean pairwise cosine distance among a concept's images), ``nn/frequency=...`` (thirds of word
frequency, Zipf scale; from the concepts table or the ``wordfreq`` package) and
``nn/polysemy=...`` (thirds, when the concepts table has it).
``null_mean`` is chance: the probability that k words drawn at random include an alias,
averaged over the row's concepts. ``null_sd`` is the analytic spread of that null, exact under
it: a concept's hit is then an independent Bernoulli draw with its chance p_c, so a mean over
m concepts has standard deviation ``sqrt(sum p_c (1 - p_c)) / m`` (:func:`chance_sd`); the
results table's ``calibrated`` and ``z_score`` are taken against this analytic null. The
p-value (headline rows) is a permutation test: images' concept labels shuffled, everything
refitted. k values not below the vocabulary size are left out (every word would be a hit).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc

from vlray import metrics
from vlray.items import TEXT
from vlray.metrics.predictive import csls, kfold
from vlray.results import Condition, Metric, score_row

from .exemplar import concept_members
from .inputs import WORD_SPAN, SmallN, StudyInputs, StudySkipped, thirds

METHODS = ("nn", "csls")

SMALL_N = SmallN(
    20,
    "concepts",
    "with fewer, P@10 is near 1 by chance (10 guesses among few concepts)",
)


def _vocabulary(inputs: StudyInputs) -> tuple[list[str], list[np.ndarray]]:
    """Distinct context words and, per language layer, each word's mean embedding."""
    items = inputs.items.filter(
        (pc.field("modality") == TEXT)
        & (pc.field("role") == "context")
        & pc.field("word").is_valid()
    )
    t = inputs.stack("language", pooling=WORD_SPAN)
    index = {item: r for r, item in enumerate(t.item_ids)}
    rows: dict[str, list[int]] = {}
    for item, word in zip(items["item_id"].to_pylist(), items["word"].to_pylist(), strict=True):
        if item in index:
            rows.setdefault(word, []).append(index[item])
    words = sorted(rows)
    means = [np.stack([m[rows[w]].mean(axis=0) for w in words]) for m in t.layers]
    return words, means


def _concept_table(inputs: StudyInputs, concepts: list[str]) -> dict[str, dict]:
    """Per concept: its word, aliases (word first), frequency and polysemy (None if absent)."""
    table = {r["concept"]: r for r in inputs.table("concepts").to_pylist()}
    out = {}
    for c in concepts:
        r = table.get(c, {})
        word = r.get("word") or c
        aliases = [word, *[a for a in (r.get("aliases") or []) if a != word]]
        out[c] = {
            "word": word,
            "aliases": aliases,
            "frequency": r.get("frequency"),
            "polysemy": r.get("polysemy"),
        }
    missing = [c for c in concepts if out[c]["frequency"] is None]
    if missing:
        try:
            from wordfreq import zipf_frequency
        except ImportError:  # frequency bins are then left out
            return out
        for c in missing:
            out[c]["frequency"] = zipf_frequency(out[c]["word"], "en")
    return out


def chance(n_words: int, n_aliases: int, k: int) -> float:
    """P(at least one of n_aliases among k of n_words drawn without replacement)."""
    if k >= n_words:
        return 1.0
    return 1.0 - math.comb(n_words - n_aliases, k) / math.comb(n_words, k)


def chance_sd(chances: np.ndarray) -> float:
    """The standard deviation of a mean of independent Bernoulli hits with chances ``chances``:
    ``sqrt(sum p (1 - p)) / m`` over the m concepts (the spread of P@k under the chance null)."""
    p = np.asarray(chances, dtype=np.float64)
    return float(np.sqrt(np.sum(p * (1.0 - p))) / len(p))


def _ranks(
    x, vocab, target, alias_sets, folds, csls_k, bases: tuple[metrics.PcaBasis, metrics.PcaBasis]
):
    """Per method, each concept's best rank (0-based) of any alias, held out once.

    ``bases`` are the PCA of all concepts and of the whole vocabulary: fitted without labels,
    so every fold and every shuffle of the concept labels shares them.
    """
    out = {m: np.empty(len(x), dtype=np.int64) for m in METHODS}
    for test in folds:
        train = np.setdiff1d(np.arange(len(x)), test)
        fitted = metrics.ProcrustesMap().fit(
            x[train], [target[train]], pca_x=bases[0], pca_ys=[bases[1]]
        )
        sims = metrics.cosine(fitted.queries(x)[0], fitted.candidates(0, vocab))
        scored = {"nn": sims[test], "csls": csls(sims, csls_k)[test]}
        for method, s in scored.items():
            for row, c in zip(s, test, strict=True):
                best = row[alias_sets[c]].max()
                out[method][c] = int((row > best).sum())
    return out


def _dispersion(stack_layer: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Mean pairwise cosine distance among each concept's images (0 for a single image)."""
    out = np.zeros(len(groups))
    for c, rows in enumerate(groups):
        if len(rows) > 1:
            z = stack_layer[rows] / np.linalg.norm(stack_layer[rows], axis=1, keepdims=True)
            sims = z @ z.T
            out[c] = 1.0 - sims[np.triu_indices(len(rows), 1)].mean()
    return out


def run(inputs: StudyInputs, run_id: str) -> list[dict]:
    options, own = inputs.options, inputs.options.concept_retrieval
    v, _, img, _ = concept_members(inputs, "context")
    words, vocab = _vocabulary(inputs)
    info = _concept_table(inputs, sorted(img))
    position = {w: i for i, w in enumerate(words)}
    concepts = [c for c in sorted(img) if info[c]["word"] in position]
    if len(concepts) < 2 * own.folds:
        raise StudySkipped(
            f"dataset '{inputs.dataset}': {len(concepts)} concept(s) with images and an "
            f"in-context word; concept retrieval over {own.folds} folds needs {2 * own.folds}"
        )
    ks = [k for k in own.k if k < len(words)]
    alias_sets = [
        np.array([position[a] for a in info[c]["aliases"] if a in position]) for c in concepts
    ]
    target_rows = np.array([position[info[c]["word"]] for c in concepts])
    chance_of = {k: np.array([chance(len(words), len(a), k) for a in alias_sets]) for k in ks}
    groups = [img[c] for c in concepts]
    depth_v, depth_t = len(v.layers), len(vocab)
    pairs = (
        [(depth_v - 1, depth_t - 1)]
        if own.layers == "last"
        else [(a, b) for a in range(depth_v) for b in range(depth_t)]
    )
    folds = kfold(len(concepts), own.folds, options.seed)
    rng = np.random.default_rng([options.seed, 17])
    shuffles = [rng.permutation(len(concepts)) for _ in range(own.permutations)]
    alpha = (1.0 - options.confidence) / 2
    boot = np.random.default_rng([options.seed, 19]).integers(
        0, len(concepts), size=(options.bootstrap, len(concepts))
    )
    breakdowns = {
        "frequency": [info[c]["frequency"] for c in concepts],
        "polysemy": [info[c]["polysemy"] for c in concepts],
    }
    rows, where = [], inputs.where("concept_retrieval", run_id)
    concept_means = {}  # vision layer -> (concept means, their PCA basis)
    vocab_bases = {}  # language layer -> PCA basis of the vocabulary
    for a, b in pairs:
        if a not in concept_means:
            x = np.stack([v.layers[a][g].mean(axis=0) for g in groups])
            concept_means[a] = x, metrics.PcaBasis.fit(x, "concept means")
        if b not in vocab_bases:
            vocab_bases[b] = metrics.PcaBasis.fit(vocab[b], "vocabulary")
        x, bases = concept_means[a][0], (concept_means[a][1], vocab_bases[b])
        target = vocab[b][target_rows]
        ranks = _ranks(x, vocab[b], target, alias_sets, folds, own.csls_k, bases)
        nulls = [
            _ranks(x[s], vocab[b], target, alias_sets, folds, own.csls_k, bases) for s in shuffles
        ]
        bins = {"dispersion": thirds(_dispersion(v.layers[a], groups))}
        for name, values in breakdowns.items():
            if sum(val is not None for val in values) >= 3 and None not in values:
                bins[name] = thirds(np.asarray(values, dtype=np.float64))
        for method in METHODS:
            for k in ks:
                hits = (ranks[method] < k).astype(np.float64)
                stats = {"null_mean": chance_of[k].mean(), "null_sd": chance_sd(chance_of[k])}
                if len(boot):
                    stats["ci_low"], stats["ci_high"] = np.quantile(
                        hits[boot].mean(axis=1), [alpha, 1 - alpha]
                    )
                if nulls:
                    null = np.array([(r[method] < k).mean() for r in nulls])
                    stats["p_value"] = (1.0 + np.sum(null >= hits.mean())) / (1.0 + len(null))
                rows.append(
                    score_row(
                        **where,
                        vision_layer=a,
                        language_layer=b,
                        metric=Metric(top_k=k),
                        condition=Condition(retrieval=method),
                        value=hits.mean(),
                        n=len(concepts),
                        **stats,
                    )
                )
                for name, labels in bins.items():
                    for label in ("low", "mid", "high"):
                        member = labels == label
                        if member.any():
                            rows.append(
                                score_row(
                                    **where,
                                    vision_layer=a,
                                    language_layer=b,
                                    metric=Metric(top_k=k),
                                    condition=Condition(
                                        retrieval=method, breakdown=name, bin=label
                                    ),
                                    value=hits[member].mean(),
                                    null_mean=chance_of[k][member].mean(),
                                    null_sd=chance_sd(chance_of[k][member]),
                                    n=int(member.sum()),
                                )
                            )
    return rows
