"""What a study reads from the lake for one (dataset, vision model, language model).

``StudyInputs`` opens only what a study asks for (one model's partition for one perturbation
and pooling, the dataset's items or an extra table) and keeps it for the other studies of the
same task. ``pairs`` is the pairing every paired study builds on: row i of the vision stack and
row i of the language stack describe the same image, through ``pair_id``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from vlray.catalog import ModelSpec
from vlray.embeddings import (
    LakeLayers,
    LayerStack,
    embedded_ids,
    layer_widths,
    load_layers,
    mean_by_group,
    take_rows,
)
from vlray.items import IMAGE, NO_PERTURBATION, TEXT
from vlray.lake import Lake
from vlray.metrics import MetricInputError, fit_options, min_items
from vlray.options import AlignOptions

WORD_SPAN = "word_span"


class SmallN(NamedTuple):
    """Below ``n`` ``unit`` a study's statistics are unstable: its scores are still written,
    with a warning that says ``why``."""

    n: int
    unit: str
    why: str

    def warning(self, n: int) -> str | None:
        if n >= self.n:
            return None
        return (
            f"scores from only {n} {self.unit}, below the documented minimum of {self.n}: "
            f"{self.why}"
        )


class StudySkipped(Exception):
    """The dataset lacks what a study needs (no trials, no perturbations, ...): not an error."""


def subset(stack: LayerStack, positions: np.ndarray) -> LayerStack:
    """The rows at ``positions``, in that order."""
    return LayerStack(
        stack.model,
        stack.item_ids[positions],
        [m[positions] for m in stack.layers],
        stack.layer_names,
        stack.pooling,
    )


class StudyInputs:
    """Lazy, cached access to one (dataset, vision model, language model)'s embeddings."""

    def __init__(
        self,
        lake: Lake,
        dataset: str,
        vision: ModelSpec,
        language: ModelSpec,
        options: AlignOptions,
    ) -> None:
        self.lake, self.dataset, self.options = lake, dataset, options
        self.vision, self.language = vision, language
        self._stacks: dict[tuple, LayerStack] = {}
        # What the studies that fan out Ray tasks report back: tasks run, largest task memory.
        self.tasks = 0
        self.peak_task_bytes = 0
        # metric -> why a study could not score it on this dataset (the others still ran)
        self.skipped_metrics: dict[str, str] = {}
        self.n = 0  # items (or trials, concepts) the study scored, for the small-n warning

    # --- metrics that cannot run on this dataset ---------------------------------------------
    def metric_fits(self, metric: str, n: int, bootstrap: int) -> bool:
        """Whether ``metric`` (with the configured options) can score ``n`` items with
        ``bootstrap`` resamples; if not, the metric is recorded as skipped, with the minimum
        n it needs and what to change."""
        need, why = min_items(metric, bootstrap, **self.options.metric_kw(metric))
        self.n = n
        if n >= need:
            return True
        self.skipped_metrics[metric] = (
            f"needs at least {need} items ({why}); the dataset has {n}; "
            + self._fix(metric, n, bootstrap)
        )
        return False

    def metric_failed(self, metric: str, err: MetricInputError, n: int, bootstrap: int) -> None:
        """Record that ``metric`` was undefined on this data (a degenerate layer, ...)."""
        self.skipped_metrics[metric] = f"{err}; {self._fix(metric, n, bootstrap)}"

    def _fix(self, metric: str, n: int, bootstrap: int) -> str:
        kwargs = self.options.metric_kw(metric)
        fit = fit_options(metric, n, bootstrap, **kwargs)
        if fit:
            setting = yaml.safe_dump({metric: {**kwargs, **fit}}, default_flow_style=True).strip()
            return f"to score it, set align.metric_kwargs: {setting}, or add items"
        if bootstrap and fit_options(metric, n, 0, **kwargs) is not None:
            return "to score it without intervals, set align.bootstrap: 0, or add items"
        return "add items (or leave the metric out of align.metrics)"

    def per_metric(
        self,
        metrics: Sequence[str],
        n: int,
        bootstrap: int,
        score: Callable[[str], list[dict]],
    ) -> list[dict]:
        """``score(metric)`` for each metric that fits ``n`` items; a metric too big for the
        dataset, or undefined on it, is skipped with its reason and the others' rows kept.
        Raises StudySkipped when no metric could be scored."""
        rows: list[dict] = []
        for metric in metrics:
            if not self.metric_fits(metric, n, bootstrap):
                continue
            try:
                rows += score(metric)
            except MetricInputError as err:
                self.metric_failed(metric, err, n, bootstrap)
        return self.scored(rows)

    def scored(self, rows: list[dict]) -> list[dict]:
        """``rows``, unless every metric was skipped (then StudySkipped with the reasons)."""
        if not rows and self.skipped_metrics:
            raise StudySkipped(
                "no metric could be scored: "
                + "; ".join(f"{m}: {why}" for m, why in self.skipped_metrics.items())
            )
        return rows

    def spec(self, side: str) -> ModelSpec:
        return self.vision if side == "vision" else self.language

    @cached_property
    def items(self) -> pa.Table:
        """The unperturbed items (perturbed copies share their original's id and roles)."""
        items = self.lake.read_items(
            self.dataset,
            columns=[
                "item_id",
                "modality",
                "pair_id",
                "role",
                "concept",
                "split",
                "word",
                "perturbation",
            ],
        )
        return items.filter(pc.field("perturbation") == NO_PERTURBATION)

    def table(self, name: str) -> pa.Table:
        return self.lake.read_table_for(self.dataset, name)

    def perturbations(self, side: str) -> list[str]:
        """The perturbations this side's model has committed partitions for (not ``none``)."""
        committed = self.lake.committed(self.dataset, self.spec(side).name)
        return sorted(p for p in committed if p != NO_PERTURBATION)

    def stack(
        self,
        side: str,
        perturbation: str = NO_PERTURBATION,
        pooling: str | None = None,
        layers: Sequence[int] | None = None,
    ) -> LayerStack:
        """Every (or the listed) layer of one side's model, rows sorted by item id (cached)."""
        spec = self.spec(side)
        wanted = None if layers is None else tuple(layers)
        key = (side, perturbation, pooling or spec.pooling[0], wanted)
        if key not in self._stacks:
            self._stacks[key] = load_layers(
                self.lake, self.dataset, spec.name, key[2], perturbation, wanted and list(wanted)
            )
        return self._stacks[key]

    def rows(self, stack: LayerStack, item_ids) -> LayerStack:
        return take_rows(stack, np.asarray(item_ids, dtype=object))

    def embedded(self, side: str, perturbation: str = NO_PERTURBATION) -> np.ndarray:
        """The ids of the items this side's model embedded (from its stack when loaded)."""
        spec = self.spec(side)
        key = (side, perturbation, spec.pooling[0], None)
        if key in self._stacks:
            return self._stacks[key].item_ids
        return embedded_ids(self.lake, self.dataset, spec.name, key[2], perturbation)

    def pairing(
        self,
        image_perturbation: str = NO_PERTURBATION,
        text_perturbation: str = NO_PERTURBATION,
        captions_of: str | None = None,
    ) -> Pairing:
        """Which rows pair up: images (``options.image_roles``) by pair id, and the captions
        whose mean (or first, ``options.captions``) is each image's text side.

        Only items both models embedded count (quarantined rows are simply absent). With
        ``captions_of`` (a text perturbation), only the captions that have that perturbation:
        the like-for-like baseline of a perturbation that only some captions have.
        """
        items, options = self.items, self.options
        captions = items.filter((pc.field("modality") == TEXT) & (pc.field("role") == "caption"))
        if captions.num_rows == 0:  # a concept-level dataset (image folders, words in context)
            raise StudySkipped(f"dataset '{self.dataset}' has no captions to pair images with")
        vision_ids = self.embedded("vision", image_perturbation)
        language_ids = self.embedded("language", text_perturbation)
        if captions_of is not None:
            language_ids = np.intersect1d(
                language_ids.astype(str), self.embedded("language", captions_of).astype(str)
            )
        images = items.filter(
            (pc.field("modality") == IMAGE) & pc.field("role").isin(list(options.image_roles))
        )
        embedded = captions.filter(pc.field("item_id").isin(language_ids)).sort_by("item_id")
        if options.captions == "first":
            first: dict[str, str] = {}
            for item_id, pair_id in zip(
                embedded["item_id"].to_pylist(), embedded["pair_id"].to_pylist(), strict=True
            ):
                first.setdefault(pair_id, item_id)
            embedded = embedded.filter(pc.field("item_id").isin(list(first.values())))
        described = set(embedded["pair_id"].to_pylist())
        images = images.filter(pc.field("item_id").isin(vision_ids))
        image_rows = sorted(
            (p, i)
            for p, i in zip(
                images["pair_id"].to_pylist(), images["item_id"].to_pylist(), strict=True
            )
            if p in described
        )
        if len(image_rows) < 3:
            raise StudySkipped(
                f"dataset '{self.dataset}': only {len(image_rows)} image(s) with captions "
                f"embedded by both '{self.vision.name}' and '{self.language.name}'"
                + (
                    ""
                    if image_perturbation == text_perturbation == NO_PERTURBATION
                    else f" (perturbation {image_perturbation}/{text_perturbation})"
                )
            )
        return Pairing(
            image_ids=np.array([i for _, i in image_rows], dtype=object),
            pair_ids=np.array([p for p, _ in image_rows], dtype=object),
            caption_ids=embedded["item_id"].to_numpy(zero_copy_only=False),
            caption_pairs=embedded["pair_id"].to_numpy(zero_copy_only=False),
        )

    def pairs(
        self,
        image_perturbation: str = NO_PERTURBATION,
        text_perturbation: str = NO_PERTURBATION,
        vision_layers: Sequence[int] | None = None,
        language_layers: Sequence[int] | None = None,
        captions_of: str | None = None,
    ) -> tuple[LayerStack, LayerStack]:
        """Both models' stacks (every layer, or those listed) in the rows of
        :meth:`pairing`: row i of each is image i, its text side the mean of its captions
        (only those that have perturbation ``captions_of``, if given)."""
        pairing = self.pairing(image_perturbation, text_perturbation, captions_of)
        v = self.stack("vision", image_perturbation, layers=vision_layers)
        t = self.stack("language", text_perturbation, layers=language_layers)
        v, t = self.rows(v, pairing.image_ids), self.rows(t, pairing.caption_ids)
        return v, mean_by_group(t, pairing.caption_pairs, pairing.pair_ids)

    def sources(self) -> tuple[LakeLayers, LakeLayers]:
        """The unperturbed pairing as per-layer sources: what sharded tasks read, one layer
        at a time, instead of the whole stacks."""
        pairing = self.pairing()
        v, t = self.vision, self.language
        names, widths = {}, {}
        for side in ("vision", "language"):
            spec = self.spec(side)
            record = self.lake.partitions(self.dataset, spec.name)[NO_PERTURBATION]
            names[side] = record["layer_names"] or [str(i) for i in range(record["layers"])]
            widths[side] = layer_widths(
                self.lake,
                self.dataset,
                spec.name,
                spec.pooling[0],
                NO_PERTURBATION,
                len(names[side]),
            )
        return (
            LakeLayers(
                self.lake,
                self.dataset,
                v.name,
                v.pooling[0],
                NO_PERTURBATION,
                pairing.image_ids,
                tuple(layer_labels_of(v.name, list(names["vision"]))),
                widths["vision"],
            ),
            LakeLayers(
                self.lake,
                self.dataset,
                t.name,
                t.pooling[0],
                NO_PERTURBATION,
                pairing.caption_ids,
                tuple(layer_labels_of(t.name, list(names["language"]))),
                widths["language"],
                groups=pairing.caption_pairs,
                order=pairing.pair_ids,
            ),
        )

    def where(self, study: str, run_id: str) -> dict:
        """The fields every results row of ``study`` shares, for ``results.grid_rows``."""
        return {
            "study": study,
            "dataset": self.dataset,
            "vision_model": self.vision.name,
            "language_model": self.language.name,
            "run_id": run_id,
        }


@dataclass(frozen=True)
class Pairing:
    """Row i of the vision side is ``image_ids[i]``; its text side is the mean of the
    captions ``caption_ids`` whose ``caption_pairs`` equals ``pair_ids[i]``."""

    image_ids: np.ndarray
    pair_ids: np.ndarray
    caption_ids: np.ndarray
    caption_pairs: np.ndarray


def layer_labels_of(model: str, names: list[str]) -> list[str]:
    return [f"{model} layer {i} ({n})" for i, n in enumerate(names)]


def layer_labels(stack: LayerStack) -> list[str]:
    names = stack.layer_names or [str(i) for i in range(len(stack.layers))]
    return layer_labels_of(stack.model, names)


def thirds(values: np.ndarray) -> np.ndarray:
    """Each value's third by rank: "low", "mid" or "high" (ties broken by position)."""
    labels = np.empty(len(values), dtype=object)
    for name, part in zip(
        ("low", "mid", "high"), np.array_split(np.argsort(values, kind="stable"), 3), strict=True
    ):
        labels[part] = name
    return labels
