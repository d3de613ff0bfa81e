"""Forced choice: is a human (or ground-truth) preference mirrored in the embedding spaces?

He, Trott & Khosla (2025), after Pick-a-Pic. A linear map between the two spaces (ridge or
Procrustes, ``forced_choice.map``) is fitted on paired training items; then, on held-out
trials, a caption mapped into the vision space picks the closer of its candidate images
(``text_to_image``), and an image mapped into the language space picks the closer of its
candidate captions (``image_to_text``). Accuracy against the preferred choice, with a
Wilson interval and a one-sided binomial test against chance, per direction and per trial kind
(columns ``direction`` and ``trial_kind``): ``lexical`` foils differ from the truth in a word,
``binding`` and ``relation`` foils in which attribute or place goes with which object, with the
same words (``vlray.items.TRIAL_KINDS``). A bag of words passes lexical trials and fails the
other two, so the kinds side by side say what a pair's shared code holds. Trials of a source
that gives no kind are scored together (``trial_kind`` null). The null is the binomial one:
``null_mean`` is chance and ``null_sd`` its spread sqrt(chance (1 - chance) / n).

Trials are cross-fitted: in each of ``folds`` folds the map is fitted without any item that a
held-out trial uses (by ``pair_id``), so every trial is scored once and none by a map that
has seen its answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
from scipy.stats import binomtest

from vlray import metrics
from vlray.embeddings import LayerStack
from vlray.items import trial_kind_order
from vlray.results import Condition, score_row

from .inputs import SmallN, StudyInputs, StudySkipped

DIRECTIONS = {"text_to_image": ("language", "vision"), "image_to_text": ("vision", "language")}

SMALL_N = SmallN(
    50,
    "trials",
    "with fewer, a two-way choice needs over 70% correct to pass the binomial test at p < 0.01",
)


def _usable_trials(inputs: StudyInputs) -> dict:
    """Per direction: (query id, choice ids, preferred index, kind) of scoreable trials."""
    trials = inputs.table("trials")
    trials = trials.filter(pc.field("preferred").is_valid())
    if trials.num_rows == 0:
        raise StudySkipped(
            f"dataset '{inputs.dataset}' has no forced-choice trials with a preference"
        )
    embedded = {side: set(inputs.stack(side).item_ids) for side in ("vision", "language")}
    out = {}
    for direction, (query_side, choice_side) in DIRECTIONS.items():
        part = trials.filter(pc.field("direction") == direction)
        # a trials table written before trials had a kind has no column: one unnamed kind
        kinds = part["kind"].to_pylist() if "kind" in part.column_names else [None] * part.num_rows
        kept = [
            (q, list(c), int(p), kind)
            for q, c, p, kind in zip(
                part["query_item_id"].to_pylist(),
                part["choice_item_ids"].to_pylist(),
                part["preferred"].to_pylist(),
                kinds,
                strict=True,
            )
            if q in embedded[query_side] and c and all(x in embedded[choice_side] for x in c)
        ]
        if kept:
            out[direction] = kept
    if not out:
        raise StudySkipped("no trial has its query and every choice embedded by both models")
    return out


def run(inputs: StudyInputs, run_id: str) -> list[dict]:
    options = inputs.options
    own = options.forced_choice
    trials = _usable_trials(inputs)
    v_train, t_train = inputs.pairs()
    pair_of = dict(
        zip(inputs.items["item_id"].to_pylist(), inputs.items["pair_id"].to_pylist(), strict=True)
    )
    train_pairs = np.array([pair_of.get(i, i) for i in v_train.item_ids], dtype=object)
    stacks = {"vision": inputs.stack("vision"), "language": inputs.stack("language")}
    index = {side: {item: r for r, item in enumerate(s.item_ids)} for side, s in stacks.items()}
    depth = {side: len(s.layers) for side, s in stacks.items()}
    layer_pairs = (
        [(a, b) for a in range(depth["vision"]) for b in range(depth["language"])]
        if own.layers == "all"
        else [(depth["vision"] - 1, depth["language"] - 1)]
    )
    rng = np.random.default_rng([options.seed, 7])
    rows, where = [], inputs.where("forced_choice", run_id)
    for direction, kept in trials.items():
        query_side, choice_side = DIRECTIONS[direction]
        side = _Direction(
            query=stacks[query_side],
            query_row=index[query_side],
            choices=stacks[choice_side],
            choice_row=index[choice_side],
            train_query=(v_train if query_side == "vision" else t_train).layers,
            train_choice=(t_train if query_side == "vision" else v_train).layers,
            query_is_vision=query_side == "vision",
        )
        # One fold assignment over every kind: a map fitted once per fold scores them all.
        fold_of = rng.permutation(len(kept)) % own.folds
        hits = np.zeros((len(kept), depth["vision"], depth["language"]), dtype=bool)
        for f in range(own.folds):
            rows_held = np.flatnonzero(fold_of == f)
            held = [kept[t] for t in rows_held]
            if not held:
                continue
            # Never fit the map on an item (or its pair) that a held-out trial uses.
            used = {pair_of.get(x, x) for q, c, _, _ in held for x in (q, *c)}
            train = ~np.isin(train_pairs, list(used))
            if train.sum() < 3:
                raise StudySkipped(f"fewer than 3 training pairs left outside fold {f}")
            hits[rows_held] = _fold_hits(own.map, held, side, train, layer_pairs)
        kinds = [kind for *_, kind in kept]
        for kind in sorted(set(kinds), key=trial_kind_order):
            mine = np.array([k == kind for k in kinds])
            chance = float(np.mean([1.0 / len(t[1]) for t in kept if t[3] == kind]))
            condition = Condition(direction=direction, trial_kind=kind)
            rows += _accuracy_rows(hits[mine], chance, condition, layer_pairs, options, where)
    return rows


def _accuracy_rows(
    hits: np.ndarray, chance: float, condition: Condition, layer_pairs, options, where: dict
) -> list[dict]:
    """One accuracy row per layer pair from the trials' hits (trials x vision x language)."""
    n = len(hits)
    null_sd = math.sqrt(chance * (1.0 - chance) / n)  # the binomial null's spread, as a rate
    rows = []
    for a, b in layer_pairs:
        k = int(hits[:, a, b].sum())
        test = binomtest(k, n, chance, alternative="greater")
        # The interval is two-sided (the one-sided test's interval would end at 1).
        ci = binomtest(k, n, chance).proportion_ci(options.confidence, method="wilson")
        rows.append(
            score_row(
                **where,
                vision_layer=a,
                language_layer=b,
                metric="accuracy",
                condition=condition,
                value=k / n,
                ci_low=ci.low,
                ci_high=ci.high,
                null_mean=chance,
                null_sd=null_sd,
                p_value=test.pvalue,
                n=n,
            )
        )
    return rows


@dataclass(frozen=True)
class _Direction:
    """One direction's embeddings: queries, their candidates, and the map's training pairs."""

    query: LayerStack
    query_row: dict[str, int]
    choices: LayerStack
    choice_row: dict[str, int]
    train_query: list[np.ndarray]
    train_choice: list[np.ndarray]
    query_is_vision: bool


def _fold_hits(
    kind: str, held: list, side: _Direction, train: np.ndarray, layer_pairs: list
) -> np.ndarray:
    """Whether each of one fold's held-out trials is chosen right, at every requested layer
    pair: a (trials, vision layers, language layers) array, False where not scored."""
    n_query, n_choice = len(side.query.layers), len(side.choices.layers)
    shape = (n_query, n_choice) if side.query_is_vision else (n_choice, n_query)
    out = np.zeros((len(held), *shape), dtype=bool)
    by_source: dict[int, list[int]] = {}  # one map fit per source layer serves its targets
    for a, b in layer_pairs:
        src, dst = (a, b) if side.query_is_vision else (b, a)
        by_source.setdefault(src, []).append(dst)
    query_rows = [side.query_row[q] for q, *_ in held]
    preferred = np.array([p for _, _, p, _ in held])
    for src, dsts in by_source.items():
        fitted = metrics.MAPS[kind]().fit(
            side.train_query[src][train], [side.train_choice[d][train] for d in dsts]
        )
        mapped = fitted.queries(side.query.layers[src][query_rows])
        for j, dst in enumerate(dsts):
            for width in sorted({len(t[1]) for t in held}):  # trials with as many choices
                sel = [i for i, t in enumerate(held) if len(t[1]) == width]
                ids = np.array([[side.choice_row[x] for x in held[t][1]] for t in sel])
                cands = fitted.candidates(j, side.choices.layers[dst][ids.ravel()])
                cands = torch.nn.functional.normalize(cands.reshape(len(sel), width, -1), dim=2)
                q = torch.nn.functional.normalize(mapped[j][sel], dim=1)
                picks = (cands * q[:, None, :]).sum(dim=2).argmax(dim=1).cpu().numpy()
                a, b = (src, dst) if side.query_is_vision else (dst, src)
                out[sel, a, b] = picks == preferred[sel]
    return out
