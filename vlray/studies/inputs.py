"""What a study reads from the lake for one (dataset, vision model, language model).

``StudyInputs`` opens only what a study asks for (one model's partition for one perturbation
and pooling, the dataset's items or an extra table) and keeps it for the other studies of the
same task. ``pairs`` is the pairing every paired study builds on: row i of the vision stack and
row i of the language stack describe the same image, through ``pair_id``.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlray.catalog import ModelSpec
from vlray.embeddings import LayerStack, load_layers, mean_by_group, take_rows
from vlray.items import IMAGE, NO_PERTURBATION, TEXT
from vlray.lake import Lake

from .options import AlignOptions

WORD_SPAN = "word_span"


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
        self, side: str, perturbation: str = NO_PERTURBATION, pooling: str | None = None
    ) -> LayerStack:
        """Every layer of one side's model, rows sorted by item id (cached)."""
        spec = self.spec(side)
        key = (side, perturbation, pooling or spec.pooling[0])
        if key not in self._stacks:
            self._stacks[key] = load_layers(
                self.lake, self.dataset, spec.name, key[2], perturbation
            )
        return self._stacks[key]

    def rows(self, stack: LayerStack, item_ids) -> LayerStack:
        return take_rows(stack, np.asarray(item_ids, dtype=object))

    def pairs(
        self, image_perturbation: str = NO_PERTURBATION, text_perturbation: str = NO_PERTURBATION
    ) -> tuple[LayerStack, LayerStack]:
        """Images (``options.image_roles``) with their captions, both models, sorted by pair.

        The language side is the mean (or the first, ``options.captions``) of each image's
        captions. Only items both models embedded count (quarantined rows are simply absent).
        """
        items, options = self.items, self.options
        captions = items.filter((pc.field("modality") == TEXT) & (pc.field("role") == "caption"))
        if captions.num_rows == 0:  # a concept-level dataset (image folders, words in context)
            raise StudySkipped(f"dataset '{self.dataset}' has no captions to pair images with")
        v = self.stack("vision", image_perturbation)
        t = self.stack("language", text_perturbation)
        images = items.filter(
            (pc.field("modality") == IMAGE) & pc.field("role").isin(list(options.image_roles))
        )
        embedded = captions.filter(pc.field("item_id").isin(t.item_ids)).sort_by("item_id")
        if options.captions == "first":
            first: dict[str, str] = {}
            for item_id, pair_id in zip(
                embedded["item_id"].to_pylist(), embedded["pair_id"].to_pylist(), strict=True
            ):
                first.setdefault(pair_id, item_id)
            embedded = embedded.filter(pc.field("item_id").isin(list(first.values())))
        described = set(embedded["pair_id"].to_pylist())
        images = images.filter(pc.field("item_id").isin(v.item_ids))
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
        pair_ids = np.array([p for p, _ in image_rows], dtype=object)
        v = self.rows(v, [i for _, i in image_rows])
        t = self.rows(t, embedded["item_id"].to_numpy(zero_copy_only=False))
        return v, mean_by_group(t, embedded["pair_id"].to_numpy(zero_copy_only=False), pair_ids)

    def where(self, study: str, run_id: str) -> dict:
        """The fields every results row of ``study`` shares, for ``results.grid_rows``."""
        return {
            "study": study,
            "dataset": self.dataset,
            "vision_model": self.vision.name,
            "language_model": self.language.name,
            "run_id": run_id,
        }


def layer_labels(stack: LayerStack) -> list[str]:
    names = stack.layer_names or [str(i) for i in range(len(stack.layers))]
    return [f"{stack.model} layer {i} ({n})" for i, n in enumerate(names)]


def thirds(values: np.ndarray) -> np.ndarray:
    """Each value's third by rank: "low", "mid" or "high" (ties broken by position)."""
    labels = np.empty(len(values), dtype=object)
    for name, part in zip(
        ("low", "mid", "high"), np.array_split(np.argsort(values, kind="stable"), 3), strict=True
    ):
        labels[part] = name
    return labels
