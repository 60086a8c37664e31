"""vertical_slash_spread: the vertical-slash estimate read from windows of queries spread over the prompt.

Its scores against their one-softmax reference (a prompt, a chunk of one, a prompt shorter than the windows), the
end-only estimate as its one-window case, and what it is for: a prompt whose end does not attend as the rest does
keeps the rest's diagonal, which the end-only estimate drops.
"""

from __future__ import annotations

import math

import pytest
import torch

from patchattn.layout import num_blocks
from patchattn.strategies import VerticalSlash, VerticalSlashSpread, get_strategy
from patchattn.strategies.vs_estimate.naive import vertical_slash_scores_naive
from patchattn.strategies.vs_estimate.spread import (
    spread_scores_naive, spread_vertical_slash_scores, window_ends, window_rows,
)


@pytest.mark.parametrize("n_q,n_keys,windows,last", [(300, 300, 8, 64), (200, 456, 8, 64), (40, 40, 8, 64), (1000, 1000, 3, 32)])
def test_spread_scores_match_the_reference(n_q, n_keys, windows, last):
    gen = torch.Generator().manual_seed(n_q)
    q, k = torch.randn(1, 4, n_q, 16, generator=gen), torch.randn(1, 2, n_keys, 16, generator=gen)
    nb = num_blocks(n_keys, 32)
    got = spread_vertical_slash_scores(q, k, 0.25, 32, nb, windows, last, columns=True)
    ref = spread_scores_naive(q, k, 0.25, 32, nb, windows, last, columns=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    rows = len(window_rows(n_q, windows, last))  # every row's probabilities sum to one
    for scores in got:
        torch.testing.assert_close(scores.sum(-1), torch.full((1, 4), float(rows)), rtol=1e-4, atol=1e-3)


def test_window_ends_are_spread_and_end_at_the_last_query():
    assert window_ends(1000, 8, 64) == [125, 250, 375, 500, 625, 750, 875, 1000]
    assert window_ends(200, 8, 64) == [64, 75, 100, 125, 150, 175, 200]  # none before one window's width
    assert window_ends(40, 8, 64) == [40]


def test_one_window_is_the_end_only_estimate():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 300, 16, generator=gen), torch.randn(1, 2, 300, 16, generator=gen)
    for a, b in zip(spread_scores_naive(q, k, 0.25, 32, 10, 1, 64), vertical_slash_scores_naive(q[:, :, -64:], k, 0.25, 32, 10)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_spread_estimate_keeps_the_prompts_diagonal_where_its_end_reads_otherwise():
    """Rows before the last quarter read the key 160 positions back (like filler read through an induction head); the
    last rows read themselves (like a question). With room for one diagonal besides the main one, the spread estimate
    keeps the 160-back diagonal (block offset 5); the end-only estimate does not."""
    n, block, dim, shift = 512, 32, 32, 160
    gen = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(1, 1, n, dim, generator=gen), dim=-1) * math.sqrt(dim)
    q = k.clone()
    q[:, :, shift : 3 * n // 4] = k[:, :, : 3 * n // 4 - shift]
    q = q * 2.0
    budget = dict(vertical_tokens=block, slash_tokens=2 * block)
    rows = torch.arange(num_blocks(n, block))
    far = (rows >= 6) & (rows < 12)  # query blocks whose block 5 back holds keys 160 back from them
    for strategy, expect in ((VerticalSlashSpread(**budget), True), (VerticalSlash(**budget), False)):
        keep = strategy.block_layout(q, k, block)[0, 0]
        on_diagonal = keep[rows[far], rows[far] - 5]
        assert bool(on_diagonal.all()) is expect, (strategy.name, on_diagonal)


def test_the_strategy_is_registered_and_calibration_offers_it():
    from patchattn.calibrate.options import DEFAULT_STRATEGIES

    assert type(get_strategy("vertical_slash_spread")) is VerticalSlashSpread
    assert "vertical_slash_spread" in DEFAULT_STRATEGIES and "vertical_slash" not in DEFAULT_STRATEGIES
    assert VerticalSlashSpread(vertical_tokens=64, slash_tokens=64).params() == {"vertical_tokens": 64, "slash_tokens": 64}
