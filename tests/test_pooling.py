"""Poolings against plain per-row formulas."""

from __future__ import annotations

import torch

from vlray import pooling as P


def test_masked_mean_ignores_padding():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = P.pool_tokens(x, "mean", mask)
    torch.testing.assert_close(out[0], x[0, :3].mean(0))
    torch.testing.assert_close(out[1], x[1].mean(0))


def test_mean_leaves_out_prefix_tokens():
    x = torch.randn(1, 4, 2)
    torch.testing.assert_close(P.pool_tokens(x, "mean", num_prefix_tokens=1)[0], x[0, 1:].mean(0))


def test_cls_and_last_token_with_right_and_left_padding():
    x = torch.randn(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(P.pool_tokens(x, "cls", right), x[:, 0])
    torch.testing.assert_close(
        P.pool_tokens(x, "last_token", right), torch.stack([x[0, 1], x[1, 3]])
    )
    torch.testing.assert_close(
        P.pool_tokens(x, "last_token", left), torch.stack([x[0, 3], x[1, 3]])
    )


def test_word_span_picks_the_overlapping_subwords():
    # "a redcircle!" tokenised as [CLS] a red ##circle ! [SEP] [PAD]; the word spans 2..11.
    # As extraction does: the overlap rule gives the word's token range, the range the mask.
    offsets = torch.tensor([[0, 0], [0, 1], [2, 5], [5, 11], [11, 12], [0, 0], [0, 0]])
    hits = torch.nonzero(P.token_overlaps(offsets[:, 0], offsets[:, 1], 2, 11)).flatten()
    span = P.token_range_mask(torch.tensor([[hits[0], hits[-1] + 1]]), 7)
    assert span.tolist() == [[False, False, True, True, False, False, False]]
    x = torch.randn(1, 7, 4)
    torch.testing.assert_close(P.pool_tokens(x, "word_span", span_mask=span)[0], x[0, 2:4].mean(0))
    # a row without the word (range -1, -1) selects no token
    assert not P.token_range_mask(torch.tensor([[-1, -1]]), 7).any()


def test_spatial_mean():
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(P.spatial_mean(x), x.flatten(2).mean(-1))
