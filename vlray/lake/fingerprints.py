"""Content hashes of a dataset's items: what makes its embeddings stale when it changes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlray.hashing import content_hash

# The order rows are hashed in, so that the same rows in another order hash the same.
SORT_KEYS = ("item_id", "modality", "perturbation")
# Values are gathered from their chunks in blocks of about this many bytes: a few blocks of
# image bytes in memory at a time, never every image joined into one array (Arrow refuses
# one beyond 2 GiB, a few tens of thousands of photos).
_BLOCK_BYTES = 64 << 20
_BLOCK_ROWS = 1 << 16


def items_fingerprint(items: pa.Table) -> str:
    """Content hash of an items table (string and binary columns, ``image`` among them): a
    changed dataset makes its embeddings stale.

    It depends on the rows' values alone, never on how Arrow holds them (chunks, slices,
    offsets, validity bitmaps, the bytes under a null). Rows are taken in ``SORT_KEYS``
    order (rows with equal keys in the table's order). Each column but ``image``, in the
    table's order, is hashed in Arrow's canonical contiguous layout, made from its values:
    the validity bitmap (zero padded), the offsets from 0 (int32; int64 beyond 2 GiB), the
    values' bytes. Then each image: ``\\0`` if null, else its length (8 bytes, little-endian)
    and its bytes. This is byte for byte what vlray hashed when it hashed the buffers that
    pyarrow's ``take`` returned (in this layout), so the fingerprints that existing lakes
    store stay valid.
    """
    return content_hash(_Encoder(items).encode(_sort_order(items)))


@dataclass(frozen=True)
class ItemsFingerprint:
    """What a dataset's embeddings depend on: the whole items table (``dataset``), and each
    (modality, perturbation) partition's own rows (``partitions``), so that a changed caption
    makes only the text partition that holds it stale, not every image model's embeddings."""

    dataset: str
    partitions: dict[tuple[str, str], str]

    @classmethod
    def of(cls, items: pa.Table) -> ItemsFingerprint:
        """The fingerprints of ``items``; each partition's is ``items_fingerprint`` of its
        rows, computed from one sort of the whole table instead of a filtered copy each."""
        encoder = _Encoder(items)
        order = _sort_order(items)
        modality = items["modality"].to_numpy()[order]
        perturbation = items["perturbation"].to_numpy()[order]
        partitions = {}
        for key in sorted(set(zip(modality.tolist(), perturbation.tolist(), strict=True))):
            # The partition's rows in the whole table's order: its own sorted order (the
            # sort is stable, so rows with equal keys keep their order either way).
            rows = order[(modality == key[0]) & (perturbation == key[1])]
            partitions[key] = content_hash(encoder.encode(rows))
        return cls(content_hash(encoder.encode(order)), partitions)

    def perturbations(self, modality: str) -> list[str]:
        return sorted(p for m, p in self.partitions if m == modality)


def _sort_order(items: pa.Table) -> np.ndarray:
    """Row indices in ``SORT_KEYS`` order; rows with equal keys keep their order."""
    keys = [(k, "ascending") for k in SORT_KEYS]
    order = pc.sort_indices(items.select(list(SORT_KEYS)), sort_keys=keys)
    return order.to_numpy().astype(np.int64)  # uint64 would turn index arithmetic to floats


class _Column:
    """One string or binary column as its values, whatever its chunks: which rows are valid,
    each row's byte length (0 for a null), and the values of any rows."""

    def __init__(self, name: str, column: pa.ChunkedArray) -> None:
        t = column.type
        if not (pa.types.is_string(t) or pa.types.is_binary(t) or _is_large(t)):
            raise TypeError(f"items column '{name}' is {t}, not string or binary")
        self.chunks = column.chunks
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])
        self.valid = _concat([pc.is_valid(c).to_numpy(zero_copy_only=False) for c in self.chunks])
        lengths = [pc.fill_null(pc.binary_length(c), 0).to_numpy() for c in self.chunks]
        self.lengths = _concat(lengths).astype(np.int64)

    def joined(self, rows: np.ndarray) -> Iterator[memoryview]:
        """The values of ``rows``, in that order, joined (a null as no bytes), in blocks of
        about ``_BLOCK_BYTES``. Each chunk is taken from on its own: pyarrow's take on a
        chunked array joins every chunk into one array first."""
        ends = np.cumsum(self.lengths[rows])
        start = 0
        while start < len(rows):
            before = int(ends[start - 1]) if start else 0
            end = int(np.searchsorted(ends, before + _BLOCK_BYTES, side="right"))
            end = min(max(end, start + 1), start + _BLOCK_ROWS)
            block = rows[start:end]
            chunk = np.searchsorted(self.starts, block, side="right") - 1
            local = block - self.starts[chunk]
            if chunk[0] == chunk[-1] and (chunk == chunk[0]).all():
                values = self.chunks[int(chunk[0])].take(pa.array(local))
            else:  # take from each chunk, then put the rows back in the block's order
                by_chunk = np.argsort(chunk, kind="stable")
                groups = np.split(by_chunk, np.flatnonzero(np.diff(chunk[by_chunk])) + 1)
                parts = [self.chunks[int(chunk[g[0]])].take(pa.array(local[g])) for g in groups]
                back = np.empty(len(block), np.int64)
                back[by_chunk] = np.arange(len(block))
                values = pa.concat_arrays(parts).take(pa.array(back))
            yield _joined(values)
            start = end

    def values(self, rows: np.ndarray) -> Iterator[tuple[int, memoryview]]:
        """``(i, bytes)`` for each valid row ``rows[i]``, in order, read where it lies (no
        copy: image bytes are most of a dataset)."""
        chunk = np.searchsorted(self.starts, rows, side="right") - 1
        data, begins = [], []
        for c in self.chunks:
            buffers = c.buffers()
            width = np.int64 if _is_large(c.type) else np.int32
            begins.append(np.frombuffer(buffers[1], width)[c.offset : c.offset + len(c)])
            data.append(memoryview(buffers[2] if buffers[2] is not None else b""))
        begin = _concat(begins).astype(np.int64)[rows]
        lengths = self.lengths[rows]
        for i in np.flatnonzero(self.valid[rows]).tolist():
            first = int(begin[i])
            yield i, data[int(chunk[i])][first : first + int(lengths[i])]


class _Encoder:
    """The canonical bytes of an items table's rows, for any subset of them in any order."""

    def __init__(self, items: pa.Table) -> None:
        self.columns = [
            _Column(name, items.column(name)) for name in items.column_names if name != "image"
        ]
        self.image = _Column("image", items.column("image"))

    def encode(self, rows: np.ndarray) -> Iterator[bytes | memoryview]:
        if len(rows) == 0:
            return
        for column in self.columns:
            yield np.packbits(column.valid[rows], bitorder="little").tobytes()
            offsets = np.zeros(len(rows) + 1, np.int64)
            np.cumsum(column.lengths[rows], out=offsets[1:])
            yield offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64).tobytes()
            yield from column.joined(rows)
        # Each image framed on its own: \0 for a null, else its length, then its bytes.
        done = 0
        for i, data in self.image.values(rows):
            if i > done:
                yield b"\0" * (i - done)
            yield len(data).to_bytes(8, "little")
            yield data
            done = i + 1
        if len(rows) > done:
            yield b"\0" * (len(rows) - done)


def _is_large(t: pa.DataType) -> bool:
    """A string or binary type with int64 offsets."""
    return pa.types.is_large_string(t) or pa.types.is_large_binary(t)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _joined(values: pa.Array) -> memoryview:
    """The bytes of every value of a string or binary array, in order, a null as none. With no
    null, the values tile the data buffer from the first offset to the last, however the
    array was built or sliced; a null is first made an empty value so that this holds."""
    if values.null_count:
        values = pc.fill_null(values, pa.scalar(b"", pa.binary()).cast(values.type))
    width = np.int64 if _is_large(values.type) else np.int32
    _, offsets, data = values.buffers()
    if data is None or len(values) == 0:
        return memoryview(b"")
    bounds = np.frombuffer(offsets, width)[values.offset : values.offset + len(values) + 1]
    return memoryview(data)[int(bounds[0]) : int(bounds[-1])]
