"""A lake with planted embeddings: known answers for the studies, written through the real lake.

Concepts and scenes have latent vectors; a "model" embeds an item as a fixed random linear map
of its latent plus noise, so the vision and language spaces share exactly the latent
structure. Layer 0 of every model is pure noise and layer 1 carries the signal. A control
model embeds everything as noise. Perturbations, forced-choice trials, aliases and
distractor words are planted so that each study has a right answer:

- ``image_semantic/replace`` and ``text_semantic/replace`` swap an item's latent for a new
  one (signal gone); ``*_appearance/jitter`` add a little noise (signal kept);
- each scene has a foil (a new latent) and two trials, the scene being preferred;
- each concept's word has an alias with the same latent; distractor words have their own.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vlray.items import concepts_table, items_table, quarantine_table, trials_table
from vlray.lake import TABLES, Lake, new_run_id
from vlray.lake.delta import write_file

LATENT = 6
CONCEPTS = [f"c{i:02d}" for i in range(20)]
DISTRACTORS = [f"d{i:02d}" for i in range(20)]
EXEMPLARS = 8
SCENES = 40
WIDTH = {"vision": 32, "language": 24}
PERTURBATIONS = {
    "vision": ["image_appearance/jitter", "image_semantic/replace"],
    "language": ["text_appearance/jitter", "text_semantic/replace"],
}
# Noise per kind of item: exemplars are noisy so that averaging them visibly helps.
NOISE = {"exemplar": 1.0, "caption": 1.0, "scene": 0.3, "context": 0.1, "foil": 0.3}


def _latents(rng: np.random.Generator) -> dict[str, np.ndarray]:
    z = {c: rng.normal(size=LATENT) for c in CONCEPTS + DISTRACTORS}
    z |= {f"s{i:02d}": rng.normal(size=LATENT) for i in range(SCENES)}
    z |= {f"s{i:02d}-foil": rng.normal(size=LATENT) for i in range(SCENES)}
    return z


def _items() -> tuple[list[dict], list[tuple[str, str, str, str]]]:
    """Item rows and, per item, (item_id, modality, role, latent key)."""
    rows, keys = [], []
    for c in CONCEPTS:
        for k in range(EXEMPLARS):
            img = f"ex-{c}-{k}"
            rows.append(
                {
                    "item_id": img,
                    "modality": "image",
                    "pair_id": img,
                    "role": "exemplar",
                    "concept": c,
                    "split": "train",
                    "image": b"x",
                }
            )
            rows.append(
                {
                    "item_id": f"{img}#c0",
                    "modality": "text",
                    "pair_id": img,
                    "role": "caption",
                    "concept": c,
                    "split": "train",
                    "text": c,
                }
            )
            keys += [(img, "image", "exemplar", c), (f"{img}#c0", "text", "caption", c)]
    words = {c: c for c in CONCEPTS} | {f"{c}_alias": c for c in CONCEPTS}
    words |= {d: d for d in DISTRACTORS}
    for word, latent in words.items():
        for k in range(3):
            item = f"ctx-{word}-{k}"
            rows.append(
                {
                    "item_id": item,
                    "modality": "text",
                    "role": "context",
                    "concept": word if word in CONCEPTS else None,
                    "split": "train",
                    "text": f"a {word} here",
                    "word": word,
                }
            )
            keys.append((item, "text", "context", latent))
    for i in range(SCENES):
        s = f"s{i:02d}"
        for item, role in ((s, "scene"), (f"{s}-foil", "foil")):
            rows.append(
                {
                    "item_id": item,
                    "modality": "image",
                    "pair_id": item,
                    "role": role,
                    "split": "train",
                    "image": b"x",
                }
            )
            rows.append(
                {
                    "item_id": f"{item}#c0",
                    "modality": "text",
                    "pair_id": item,
                    "role": "caption" if role == "scene" else "foil",
                    "split": "train",
                    "text": item,
                }
            )
            keys += [
                (item, "image", role, item),
                (f"{item}#c0", "text", "caption" if role == "scene" else "foil", item),
            ]
    return rows, keys


def _trials() -> list[dict]:
    out = []
    for i in range(SCENES):
        s = f"s{i:02d}"
        flip = i % 2  # the preferred item is first in half the trials
        images, captions = [s, f"{s}-foil"], [f"{s}#c0", f"{s}-foil#c0"]
        if flip:
            images, captions = images[::-1], captions[::-1]
        out.append(
            {
                "trial_id": f"{s}/t2i",
                "direction": "text_to_image",
                "kind": "lexical",
                "query_item_id": f"{s}#c0",
                "choice_item_ids": images,
                "preferred": flip,
                "label": [float(j == flip) for j in range(2)],
                "split": "train",
            }
        )
        out.append(
            {
                "trial_id": f"{s}/i2t",
                "direction": "image_to_text",
                "kind": "lexical",
                "query_item_id": s,
                "choice_item_ids": captions,
                "preferred": flip,
                "label": [float(j == flip) for j in range(2)],
                "split": "train",
            }
        )
    return out


def _embed(keys, z, side, control, perturbation, rng_seed) -> dict[str, np.ndarray]:
    """item_id -> (layers, width) embeddings of one side's model for one perturbation."""
    modality = "image" if side == "vision" else "text"
    rng = np.random.default_rng(rng_seed)
    proj = np.random.default_rng([1, len(side)]).normal(size=(LATENT, WIDTH[side]))
    out = {}
    for item, mod, role, latent in keys:
        if mod != modality or (
            perturbation != "none" and role != ("scene" if side == "vision" else "caption")
        ):
            continue
        if perturbation != "none" and "#c0" in item and item.split("#")[0].endswith("foil"):
            continue
        vec = z[latent]
        if perturbation.endswith("replace"):
            vec = rng.normal(size=LATENT)
        signal = vec @ proj
        noise = NOISE[role] * rng.normal(size=WIDTH[side])
        if perturbation.endswith("jitter"):
            noise += 0.1 * rng.normal(size=WIDTH[side])
        layer1 = rng.normal(size=WIDTH[side]) * 2 if control else signal + noise
        out[item] = np.stack([rng.normal(size=WIDTH[side]), layer1]).astype(np.float32)
    return out


def _commit(
    lake: Lake,
    dataset: str,
    model: str,
    perturbation: str,
    emb: dict,
    pooling,
    modality: str,
    run_id: str,
) -> None:
    """Written and committed through the lake's own path: files, then one transaction."""
    spec = TABLES["embeddings"]
    ids = sorted(emb)
    adds = []
    for layer in range(2):
        rows = [(i, p) for i in ids for p in pooling(i)]
        vectors = np.stack([emb[i][layer] for i, _ in rows])
        table = pa.table(
            {
                "item_id": [i for i, _ in rows],
                "modality": [modality] * len(rows),
                "pooling": [p for _, p in rows],
                "embedding": pa.array(list(vectors), pa.list_(pa.float32())),
            }
        )
        partition = {
            "dataset": dataset,
            "model": model,
            "perturbation": perturbation,
            "layer": layer,
        }
        adds.append(write_file(lake.storage, spec, table, partition, run_id))
    lake.commit_embeddings(
        dataset,
        model,
        adds,
        [
            {
                "dataset": dataset,
                "model": model,
                "perturbation": perturbation,
                "model_revision": "planted",
                "config_hash": f"planted-{model}-{perturbation}",
                "rows": len(ids) * 2,
                "items": len(ids),
                "layers": 2,
                "layer_names": ["noise", "signal"],
            }
        ],
        run_id,
    )


def plant_lake(path: str, models: dict[str, tuple[str, bool]], dataset: str = "planted") -> Lake:
    """Write the planted world; ``models`` maps a catalog name to (side, is_control)."""
    lake = Lake(path)
    run_id = new_run_id()
    rows, keys = _items()
    items = items_table(rows)
    perturbed = []
    for side, names in PERTURBATIONS.items():
        for p in names:
            role = "scene" if side == "vision" else "caption"
            perturbed += [
                {**r, "perturbation": p}
                for r in rows
                if r["role"] == role
                and r["modality"] == ("image" if side == "vision" else "text")
                and not r["item_id"].startswith("ex-")
            ]
    items = pa.concat_tables([items, items_table(perturbed)])
    lake.write_items(dataset, items, quarantine_table([]), run_id)
    lake.write_table_for(dataset, "trials", trials_table(_trials()), run_id)
    lake.write_table_for(
        dataset,
        "concepts",
        concepts_table(
            [
                {
                    "concept": c,
                    "word": c,
                    "aliases": [c, f"{c}_alias"],
                    "frequency": float(i % 7),
                    "polysemy": None,
                }
                for i, c in enumerate(CONCEPTS)
            ]
        ),
        run_id,
    )
    z = _latents(np.random.default_rng(0))
    words = {r["item_id"] for r in rows if r.get("word")}
    for seed, (model, (side, control)) in enumerate(models.items()):

        def pooling(item, side=side):
            return ["mean", "word_span"] if item in words else ["mean"]

        for p in ["none", *PERTURBATIONS[side]]:
            emb = _embed(keys, z, side, control, p, [seed, len(p)])
            modality = "image" if side == "vision" else "text"
            _commit(lake, dataset, model, p, emb, pooling, modality, run_id)
    return lake
