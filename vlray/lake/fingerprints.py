"""Content hashes of a dataset's items: what makes its embeddings stale when it changes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc


def items_fingerprint(items: pa.Table) -> str:
    """Content hash of an items table: a changed dataset makes its embeddings stale.

    Rows are hashed in (item_id, modality, perturbation) order. The image bytes are hashed
    row by row rather than sorted as a column: sorting would concatenate every image into one
    Arrow array, which Arrow refuses beyond 2 GiB (a few tens of thousands of photos).
    """
    keys = [("item_id", "ascending"), ("modality", "ascending"), ("perturbation", "ascending")]
    order = pc.sort_indices(items.select([k for k, _ in keys]), sort_keys=keys)
    h = hashlib.sha256()
    for batch in items.drop_columns(["image"]).take(order).to_batches():
        for column in batch.columns:
            for buf in column.buffers():
                if buf is not None:
                    h.update(buf)
    image = items.column("image")
    for i in order.to_numpy():
        value = image[int(i)]
        data = value.as_buffer() if value.is_valid else None
        h.update(b"\0" if data is None else len(data).to_bytes(8, "little"))
        if data is not None:
            h.update(data)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ItemsFingerprint:
    """What a dataset's embeddings depend on: the whole items table (``dataset``), and each
    (modality, perturbation) partition's own rows (``partitions``), so that a changed caption
    makes only the text partition that holds it stale, not every image model's embeddings."""

    dataset: str
    partitions: dict[tuple[str, str], str]

    @classmethod
    def of(cls, items: pa.Table) -> ItemsFingerprint:
        keys = (
            items.select(["modality", "perturbation"])
            .group_by(["modality", "perturbation"])
            .aggregate([])
        )
        partitions = {}
        for modality, perturbation in zip(
            keys["modality"].to_pylist(), keys["perturbation"].to_pylist(), strict=True
        ):
            rows = items.filter(
                (pc.field("modality") == modality) & (pc.field("perturbation") == perturbation)
            )
            partitions[(modality, perturbation)] = items_fingerprint(rows)
        return cls(items_fingerprint(items), partitions)

    def perturbations(self, modality: str) -> list[str]:
        return sorted(p for m, p in self.partitions if m == modality)
