"""Arrays from the lake, in one call: the paired per-layer arrays the studies score.

    import vlray
    from vlray import metrics

    lake = vlray.open_lake("demo-out/lake")
    p = lake.pairs("shapes", vision="efficientnet_lite0", language="minilm_l6")
    metrics.grid(p.vision, p.language, "cka")        # what the layerwise study scored

Row i of every vision layer is image ``p.ids[i]``; row i of every language layer is the
mean of that image's captions (the studies' pairing, ``align.captions: mean``). The same call
gives a perturbed twin (``image_perturbation=`` / ``text_perturbation=``, the rows of the
perturbation study), and :meth:`LakeArrays.concepts` gives concept means (a concept's images
averaged, and its captions or in-context words averaged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from vlray.catalog import CatalogError, ModelSpec, get_spec
from vlray.items import NO_PERTURBATION
from vlray.lake import Lake
from vlray.options import AlignOptions
from vlray.studies.exemplar import concept_members
from vlray.studies.inputs import StudyInputs

Layers = Sequence[int] | int | Literal["all", "last"] | None


@dataclass(frozen=True)
class Paired:
    """Two models' layers over the same rows: ``vision[l]`` and ``language[l]`` are
    ``(n, width)`` arrays (numpy, or torch with ``as_="torch"``), row i describing
    ``ids[i]`` (an image id for :meth:`LakeArrays.pairs`, a concept for ``concepts``)."""

    dataset: str
    vision_model: str
    language_model: str
    ids: np.ndarray
    vision: list
    language: list
    vision_layers: list[int]  # the lake's layer index of each entry of ``vision``
    language_layers: list[int]
    vision_layer_names: list[str]
    language_layer_names: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def open_lake(uri: str, as_of: int | str | None = None) -> LakeArrays:
    """The lake at ``uri`` (a path or ``s3://...``), for reading arrays; ``as_of`` pins an
    embeddings table version (see ``vlray lake history``)."""
    return LakeArrays(Lake(uri, as_of=as_of))


class LakeArrays:
    """Read-only access to a lake's embeddings as the studies pair them."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake

    def datasets(self) -> list[str]:
        return sorted({r["dataset"] for r in self.lake.manifest().to_pylist()})

    def models(self, dataset: str) -> dict[str, dict]:
        """model -> its unperturbed partition's record: layers, layer_names, items, init."""
        return {
            r["model"]: r
            for r in self.lake.manifest().to_pylist()
            if r["dataset"] == dataset and r["perturbation"] == NO_PERTURBATION
        }

    def _inputs(
        self,
        dataset: str,
        held: dict[str, dict],
        vision: str,
        language: str,
        pooling: str | tuple[str, str] | None,
        **options,
    ) -> StudyInputs:
        """What the studies read for the pair; ``held`` is :meth:`models` of ``dataset``."""
        poolings = pooling if isinstance(pooling, tuple) else (pooling, pooling)
        specs = [
            self._spec(dataset, held, name, modality, p)
            for name, modality, p in zip(
                (vision, language), ("vision", "language"), poolings, strict=True
            )
        ]
        return StudyInputs(self.lake, dataset, *specs, AlignOptions(**options))

    def _spec(
        self, dataset: str, held: dict[str, dict], name: str, modality: str, pooling: str | None
    ) -> ModelSpec:
        """The model's catalog entry (its first pooling is what the studies use), or, for a
        model the catalog does not know, a stand-in that names the lake's pooling."""
        if name not in held:
            raise ValueError(
                f"dataset '{dataset}' in {self.lake.uri} has no embeddings of model '{name}'; "
                f"it has: {', '.join(sorted(held)) or 'none'}"
            )
        try:
            spec = get_spec(name)
        except CatalogError:
            spec = ModelSpec(name=name, modality=modality, source="packaged", id=name)
        if spec.modality != modality:
            raise ValueError(f"model '{name}' is a {spec.modality} model, not {modality}")
        return spec if pooling is None else spec.model_copy(update={"pooling": [pooling]})

    @staticmethod
    def _layers(held: dict[str, dict], model: str, layers: Layers) -> list[int]:
        count = held[model]["layers"]
        if layers is None or layers == "all":
            return list(range(count))
        if layers == "last":
            return [count - 1]
        wanted = [layers] if isinstance(layers, int) else list(layers)
        bad = [x for x in wanted if not isinstance(x, int) or not -count <= x < count]
        if bad:
            raise ValueError(f"model '{model}' has layers 0..{count - 1}; asked for {bad}")
        return [x % count for x in wanted]

    def pairs(
        self,
        dataset: str,
        *,
        vision: str,
        language: str,
        layers: Layers = None,
        vision_layers: Layers = None,
        language_layers: Layers = None,
        pooling: str | tuple[str, str] | None = None,
        image_perturbation: str = NO_PERTURBATION,
        text_perturbation: str = NO_PERTURBATION,
        captions: Literal["mean", "first"] = "mean",
        image_roles: Sequence[str] = ("scene", "exemplar"),
        as_: Literal["numpy", "torch"] = "numpy",
    ) -> Paired:
        """Images paired with their captions, as the layerwise study scores them.

        ``layers`` (both sides; or ``vision_layers`` / ``language_layers``): None or "all",
        "last", a layer index or a list of them. ``pooling``: one for both models or a
        (vision, language) tuple; default each model's first catalog pooling, as the studies
        use. A perturbation gives the perturbed twin of the same pairing.
        """
        held = self.models(dataset)
        inputs = self._inputs(
            dataset,
            held,
            vision,
            language,
            pooling,
            captions=captions,
            image_roles=tuple(image_roles),
        )
        vl = self._layers(held, vision, layers if vision_layers is None else vision_layers)
        ll = self._layers(held, language, layers if language_layers is None else language_layers)
        v, t = inputs.pairs(image_perturbation, text_perturbation, vl, ll)
        return _paired(dataset, v.item_ids, v, t, vl, ll, as_)

    def concepts(
        self,
        dataset: str,
        *,
        vision: str,
        language: str,
        layers: Layers = None,
        text: Literal["caption", "context"] = "caption",
        image_roles: Sequence[str] = ("scene", "exemplar"),
        as_: Literal["numpy", "torch"] = "numpy",
    ) -> Paired:
        """One row per concept with both images and texts: the mean of its images and the
        mean of its captions (``text="caption"``) or in-context words (``"context"``, with
        word-span pooling), as the exemplar study's k = all point."""
        held = self.models(dataset)
        inputs = self._inputs(dataset, held, vision, language, None, image_roles=tuple(image_roles))
        v, t, img, txt = concept_members(inputs, text)
        names = sorted(set(img) & set(txt))
        vl, ll = (self._layers(held, m, layers) for m in (vision, language))
        v_means = [np.stack([v.layers[i][img[c]].mean(axis=0) for c in names]) for i in vl]
        t_means = [np.stack([t.layers[i][txt[c]].mean(axis=0) for c in names]) for i in ll]
        return _paired(
            dataset,
            np.array(names, dtype=object),
            replace(v, layers=v_means),
            replace(t, layers=t_means),
            vl,
            ll,
            as_,
        )


def _paired(dataset, ids, v, t, vl, ll, as_) -> Paired:
    if as_ not in ("numpy", "torch"):
        raise ValueError(f"as_ must be 'numpy' or 'torch', got {as_!r}")
    convert = _as_torch if as_ == "torch" else np.asarray
    return Paired(
        dataset=dataset,
        vision_model=v.model,
        language_model=t.model,
        ids=np.asarray(ids),
        vision=[convert(m) for m in v.layers],
        language=[convert(m) for m in t.layers],
        vision_layers=vl,
        language_layers=ll,
        vision_layer_names=[_name(v.layer_names, i) for i in vl],
        language_layer_names=[_name(t.layer_names, i) for i in ll],
    )


def _name(names: list[str], i: int) -> str:
    return names[i] if i < len(names) else f"layer {i}"


def _as_torch(m: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(m))
