"""Poolings: one vector per item from a layer's activations.

All functions take torch tensors on any device and return ``(batch, dim)`` on the same device,
so that a whole batch's layers can be pooled without leaving the GPU.
"""

from __future__ import annotations

import torch

POOLINGS = ("cls", "mean", "last_token", "word_span")


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial positions of a CNN feature map ``(B, C, H, W)``."""
    return x.mean(dim=(2, 3))


def cls(x: torch.Tensor) -> torch.Tensor:
    """The first token of ``(B, T, D)``: the CLS token for BERT and ViT."""
    return x[:, 0]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``(B, T, D)`` over the tokens where ``mask`` ``(B, T)`` is true.

    Padding never leaks into the mean; a row with an empty mask is an error upstream, so it
    yields NaN here rather than a silent zero vector.
    """
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1)


def last_token(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last non-padding token of each row (right or left padding both work)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).amax(dim=1)
    return x[torch.arange(x.shape[0], device=x.device), last]


def word_span_mask(
    offsets: torch.Tensor, attention_mask: torch.Tensor, spans: list[tuple[int, int]]
) -> torch.Tensor:
    """Tokens whose character offsets overlap each row's ``(start, end)`` span.

    ``offsets`` is the tokenizer's ``offset_mapping`` ``(B, T, 2)``; special tokens have the
    empty offset ``(0, 0)`` and never overlap a non-empty span.
    """
    span = torch.tensor(spans, device=offsets.device, dtype=offsets.dtype)  # (B, 2)
    start, end = span[:, :1], span[:, 1:]
    tok_start, tok_end = offsets[..., 0], offsets[..., 1]
    overlaps = (tok_start < end) & (tok_end > start) & (tok_end > tok_start)
    return overlaps & attention_mask.bool()


def pool_tokens(
    x: torch.Tensor,
    pooling: str,
    mask: torch.Tensor | None = None,
    span_mask: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Pool a token sequence ``(B, T, D)`` by name: cls, mean, last_token or word_span.

    ``num_prefix_tokens`` (CLS and register tokens of a ViT) are left out of ``mean``.
    """
    if mask is None:
        if pooling == "mean":  # every token counts: a plain mean, one pass over the layer
            return x[:, num_prefix_tokens:].mean(dim=1)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if pooling == "cls":
        return cls(x)
    if pooling == "mean":
        if num_prefix_tokens:
            mask = mask.clone()
            mask[:, :num_prefix_tokens] = False
        return masked_mean(x, mask)
    if pooling == "last_token":
        return last_token(x, mask)
    if pooling == "word_span":
        if span_mask is None:
            raise ValueError("word_span pooling needs a span mask")
        return masked_mean(x, span_mask)
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
