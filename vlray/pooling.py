"""Poolings: one vector per item from a layer's activations.

A pooling is one function ``(x, masks) -> vectors`` in :data:`POOLING_FUNCTIONS`; adding one
is that function plus its entry, and :data:`POOLINGS` (what the catalog accepts) follows.
Every function takes torch tensors on any device and keeps them there, so that a whole batch's
layers are pooled without leaving the GPU. ``x`` is ``(..., B, T, D)``: one layer, or the
language encoder's layers stacked in front, pooled in one pass.

Importing this module does not import torch, so that validating a catalog stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TokenMasks:
    """Which tokens of a ``(B, T)`` batch a pooling reads."""

    real: torch.Tensor | None = None  # True at real tokens, False at padding; None: all real
    word: torch.Tensor | None = None  # True at the target word's sub-word tokens (word_span)
    prefix: int = 0  # leading CLS and register tokens of a ViT, which mean leaves out


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial positions of a CNN feature map ``(B, C, H, W)``."""
    return x.mean(dim=(2, 3))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``(..., B, T, D)`` over the tokens where ``mask`` ``(B, T)`` is true.

    Padding never leaks into the mean; a row with an empty mask is an error upstream, so it
    yields NaN here rather than a silent zero vector.
    """
    weights = mask.to(x.dtype)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    # A weighted sum over tokens as one batched product over every leading layer.
    return (weights[:, None, :] @ x).squeeze(-2)


def cls(x: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """The first token: the CLS token for BERT and ViT."""
    return x[..., 0, :]


def mean(x: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """Mean over the real tokens, prefix tokens left out."""
    if masks.real is None:  # every token counts: a plain mean, one pass over the layer
        return x[..., masks.prefix :, :].mean(dim=-2)
    real = masks.real
    if masks.prefix:
        real = real.clone()
        real[:, : masks.prefix] = False
    return masked_mean(x, real)


def last_token(x: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """The last real token of each row (right or left padding both work)."""
    import torch

    if masks.real is None:
        return x[..., -1, :]
    real = masks.real
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    last = torch.where(real.bool(), positions, -1).amax(dim=1)
    return x[..., torch.arange(real.shape[0], device=x.device), last, :]


def word_span(x: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """Mean of the target word's sub-word tokens in context."""
    if masks.word is None:
        raise ValueError("word_span pooling needs a span mask")
    return masked_mean(x, masks.word)


# The one list of poolings: name -> function.
POOLING_FUNCTIONS: dict[str, Callable[[torch.Tensor, TokenMasks], torch.Tensor]] = {
    "cls": cls,
    "mean": mean,
    "last_token": last_token,
    "word_span": word_span,
}
POOLINGS = tuple(POOLING_FUNCTIONS)


def pool_tokens(
    x: torch.Tensor,
    pooling: str,
    mask: torch.Tensor | None = None,
    span_mask: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Pool a token sequence ``(..., B, T, D)`` by name; ``(..., B, D)``.

    ``mask`` ``(B, T)`` marks real tokens (None: all are); ``span_mask`` the target word's
    tokens, for ``word_span``; ``num_prefix_tokens`` (CLS and register tokens of a ViT) are
    left out of ``mean``.
    """
    try:
        function = POOLING_FUNCTIONS[pooling]
    except KeyError:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}") from None
    return function(x, TokenMasks(mask, span_mask, num_prefix_tokens))


def token_overlaps(tok_start: Any, tok_end: Any, start: Any, end: Any) -> Any:
    """Whether tokens with character offsets ``[tok_start, tok_end)`` overlap ``[start, end)``.

    Elementwise on numbers, numpy arrays or tensors alike. Special tokens have the empty
    offset ``(0, 0)`` and never overlap a non-empty span.
    """
    return (tok_start < end) & (tok_end > start) & (tok_end > tok_start)


def token_range_mask(ranges: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)``: True at the token positions in each row's ``[start, end)`` of ``ranges``
    ``(B, 2)``; a row with the range ``(-1, -1)`` (no target word) is all False."""
    import torch

    positions = torch.arange(width, device=ranges.device)[None, :]
    return (positions >= ranges[:, :1]) & (positions < ranges[:, 1:])
