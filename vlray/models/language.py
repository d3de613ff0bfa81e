"""Language encoders: tokenising texts (with a target word's token span) and reading every
hidden state of a Hugging Face model, in length buckets so that little is padding."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from vlray import pooling as P
from vlray.catalog import ModelSpec
from vlray.models.devices import Pooled, autocast, default_device, device_stream, to_device, to_host
from vlray.models.layers import hidden_state_indices, hidden_state_name
from vlray.models.weights import hf_model, tokenizer_location

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """A language model's fast tokenizer (its own, or the one its catalog entry borrows)."""
    from transformers import AutoTokenizer

    location, revision = tokenizer_location(spec)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, use_fast=True)
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have no pad token
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class Tokens:
    """Texts as token ids, made on a CPU (a Ray task) without the model."""

    ids: list[np.ndarray]  # one int32 array per text, special tokens included
    spans: np.ndarray  # (n, 2) token range [start, end) of the target word; -1 where none


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    words: Sequence[str | None] | None,
    max_length: int,
) -> tuple[Tokens, dict[int, str]]:
    """Token ids for each text, and for texts with a target word the range of its sub-word
    tokens. Returns the tokens and ``{row: reason}`` for texts whose word is not usable
    (absent from the text, or cut off by ``max_length``); those rows get no span."""
    texts = list(texts)
    words = list(words) if words is not None else [None] * len(texts)
    need_offsets = any(words)
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=need_offsets,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
    spans = np.full((len(texts), 2), -1, dtype=np.int32)
    errors: dict[int, str] = {}
    for i, word in enumerate(words):
        if not word:
            continue
        try:
            start, end = find_word_span(texts[i], word)
        except ValueError as err:
            errors[i] = str(err)
            continue
        offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
        hits = np.flatnonzero(P.token_overlaps(offsets[:, 0], offsets[:, 1], start, end))
        if not len(hits):
            errors[i] = f"target word '{word}' lies beyond the first {max_length} tokens"
            continue
        spans[i] = (hits[0], hits[-1] + 1)
    return Tokens(ids, spans), errors


class LanguageEncoder:
    """A Hugging Face model read through ``output_hidden_states`` (embeddings + every block)."""

    modality = "language"

    def __init__(
        self,
        spec: ModelSpec,
        device: str | None = None,
        precision: str = "auto",
        bucket_rows: int = 256,
        bucket_tokens: int | None = None,
    ):
        self.spec = spec
        self.device = device or default_device()
        self.precision = precision
        self.bucket_rows = bucket_rows
        self.bucket_tokens = bucket_tokens
        self.model = hf_model(spec).eval().to(self.device)
        self.tokenizer = load_tokenizer(spec)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.layer_indices = hidden_state_indices(spec, self.model.config)
        self.layer_names = [hidden_state_name(i) for i in self.layer_indices]

    def embed(
        self, texts: Sequence[str], words: Sequence[str | None] | None = None
    ) -> list[Pooled]:
        """Pool every layer for a batch of texts.

        Rows with a target ``word`` get ``word_span`` pooling (the mean of the word's sub-word
        tokens in context); the others get the catalog's poolings. A word that does not occur in
        its text raises ``ValueError`` naming it; check with ``find_word_span`` first.
        """
        tokens, errors = tokenize(self.tokenizer, texts, words, self.spec.max_length)
        if errors:
            raise ValueError(next(iter(errors.values())))
        return self.embed_tokens(tokens)

    def buckets(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Rows in length buckets (each sorted by length), so that little is padding.

        Without ``bucket_tokens``: equal numbers of rows, at most ``bucket_rows`` each. With it
        (on a GPU, where one forward pass should be large): about one bucket per
        ``bucket_tokens`` real tokens (and per ``bucket_rows`` rows), cut where padding is least.
        """
        order = np.argsort(lengths, kind="stable")
        n = len(order)
        if n == 0:
            return []
        k = max(1, -(-n // self.bucket_rows))
        if self.bucket_tokens is None:
            return [b for b in np.array_split(order, k) if len(b)]
        k = max(k, -(-int(lengths.sum()) // self.bucket_tokens))
        return np.split(order, least_padding_cuts(lengths[order], k))

    @torch.inference_mode()
    def embed_tokens(self, tokens: Tokens) -> list[Pooled]:
        """Pool every layer for tokenised texts, in length buckets so little is padding.

        Each bucket is uploaded in one copy; every layer and pooling of the whole batch is
        computed on the device and comes back in one copy (no per-layer synchronisation).
        """
        n = len(tokens.ids)
        if n == 0:
            return []
        lengths = np.fromiter((len(x) for x in tokens.ids), dtype=np.int64, count=n)
        spans = np.asarray(tokens.spans, dtype=np.int64).reshape(n, 2)
        buckets = self.buckets(lengths)
        order = np.concatenate(buckets)
        span_sorted = spans[order, 0] >= 0
        poolings = list(self.spec.pooling) + (["word_span"] if span_sorted.any() else [])
        with device_stream(self.device):
            blocks = [
                self._embed_bucket(tokens, rows, lengths[rows], spans[rows], poolings)
                for rows in buckets
            ]
            stacked = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)  # (L, P, n, D)
            select = {}  # pooling -> (batch rows, device index or None for all rows)
            for p in poolings:
                pos = np.flatnonzero(span_sorted if p == "word_span" else ~span_sorted)
                if len(pos):
                    index = None if len(pos) == n else to_device(pos, self.device)
                    select[p] = (order[pos], index)
            pooled = []
            for i in range(len(self.layer_indices)):
                for j, p in enumerate(poolings):
                    if p in select:
                        rows, index = select[p]
                        t = stacked[i, j] if index is None else stacked[i, j].index_select(0, index)
                        pooled.append((i, p, rows, t))
            return to_host(pooled)

    def _embed_bucket(
        self,
        tokens: Tokens,
        rows: np.ndarray,
        lengths: np.ndarray,
        spans: np.ndarray,
        poolings: list[str],
    ) -> torch.Tensor:
        """Every tapped layer of one bucket, pooled: ``(layers, len(poolings), rows, dim)``.

        Right padding (causal models' real tokens are unaffected). Poolings are computed for
        every row of the bucket; the caller keeps each row's own.
        """
        b, width = len(rows), int(lengths.max())
        # ids, then length, span start, span end: one array, one upload.
        packed = np.full((b, width + 3), self.pad_id, dtype=np.int64)
        real = np.arange(width)[None, :] < lengths[:, None]
        ids = packed[:, :width]
        ids[real] = np.concatenate([tokens.ids[r] for r in rows])
        packed[:, width] = lengths
        packed[:, width + 1 :] = spans
        dev = to_device(packed, self.device)
        ids_t, lens = dev[:, :width].contiguous(), dev[:, width]
        positions = torch.arange(width, device=dev.device)
        mask = positions[None, :] < lens[:, None]
        with autocast(self.device, self.precision), _attention_kernels(self.device):
            out = self.model(input_ids=ids_t, attention_mask=mask.long(), output_hidden_states=True)
        hidden = torch.stack([out.hidden_states[i] for i in self.layer_indices]).float()
        # Rows without a target word get an empty word mask, so NaN; the caller drops them.
        word = P.token_range_mask(dev[:, width + 1 :], width) if "word_span" in poolings else None
        pooled = [P.pool_tokens(hidden, p, mask=mask, span_mask=word) for p in poolings]
        return torch.stack(pooled, dim=1)


def _attention_kernels(device: str):
    """On a GPU, attention without cuDNN's kernel: it builds an execution plan for every new
    shape, and length buckets make nearly every forward pass a new shape. The memory-efficient
    and flash kernels need no plans (the extraction benchmark's text model phase fell from 3.5 s
    to 2.0 s for 40,000 captions on an H100 without it)."""
    if not device.startswith("cuda"):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


def least_padding_cuts(lengths: np.ndarray, k: int) -> np.ndarray:
    """Where to cut sorted ``lengths`` into at most ``k`` runs so that the padded total
    (each run's size times its longest length) is least. Cuts fall between distinct lengths;
    a dynamic programme over the distinct lengths (a few dozen for real text)."""
    values, counts = np.unique(lengths, return_counts=True)
    m = len(values)
    k = min(k, m)
    if k <= 1:
        return np.zeros(0, dtype=np.int64)
    ends = np.concatenate([[0], np.cumsum(counts)])  # rows before each distinct value
    cost = np.full(m + 1, np.inf)
    cost[0] = 0.0
    choice = np.zeros((k + 1, m + 1), dtype=np.int64)
    for j in range(1, k + 1):
        new = np.full(m + 1, np.inf)
        for e in range(1, m + 1):
            # A run over distinct values s..e-1: (rows) * (its longest length).
            total = cost[:e] + (ends[e] - ends[:e]) * values[e - 1]
            s = int(np.argmin(total))
            new[e], choice[j, e] = total[s], s
        cost = new
    cuts, e = [], m
    for j in range(k, 0, -1):
        s = choice[j, e]
        if s > 0:
            cuts.append(ends[s])
        e = s
        if e == 0:
            break
    return np.array(sorted(cuts), dtype=np.int64)


def find_word_span(text: str, word: str) -> tuple[int, int]:
    """Character span of ``word`` in ``text`` (exact match first, then case-insensitive)."""
    start = text.find(word)
    if start < 0:
        start = text.lower().find(word.lower())
    if start < 0:
        raise ValueError(f"target word '{word}' does not occur in the text '{text}'")
    return start, start + len(word)
