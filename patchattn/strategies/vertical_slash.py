"""Vertical-slash heads (MInference): a few important key columns plus a few diagonals.

The pattern is estimated from the attention of the last ``LAST_Q`` queries: summed over those queries,
the probabilities per key column give the vertical scores and, per diagonal offset (query position minus
key position), the slash scores. ``vertical_slash`` works at block granularity: a query block keeps the top
``vertical_tokens`` worth of key-column blocks and every block on the top ``slash_tokens`` worth of block
diagonals; the sink block and the main diagonal are always kept. ``vertical_slash_tokens`` keeps the same
diagonal blocks but its verticals are single key positions, as MInference's are: the top ``vertical_tokens``
columns, read by every query block after them, gathered ``block_size`` at a time (a column costs 1/block_size
of a block; a query block whose blocks and columns would cost as much as dense reads its causal blocks instead:
:func:`patchattn.layout.column_reads`). Heavy-hitter keys (punctuation, newlines, the sink) lie scattered; whole
blocks around them waste most of what they compute. ``vertical_slash_spread`` reads the estimate from windows of
queries spread over the prompt instead of its end (:mod:`patchattn.strategies.vs_estimate.spread`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Estimate, Strategy, blocks_for, check_int, per_head
from .registry import register
from .vs_estimate.spread import spread_vertical_slash_scores

LAST_Q = 64
SPREAD_WINDOWS = 8  # vertical_slash_spread's windows of LAST_Q queries


def _top_ranks(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(B, h, n) bool: True on each head's ``counts[h]`` highest scores."""
    top = scores.topk(max(counts), dim=-1).indices
    if min(counts) == max(counts):
        ranks_kept = torch.ones_like(top, dtype=torch.bool)
    else:
        limit = per_head(counts, scores.device)
        ranks_kept = (torch.arange(top.shape[-1], device=scores.device) < limit[:, None]).expand_as(top)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, ranks_kept)


@register
@dataclass(frozen=True)
class VerticalSlash(Strategy):
    name: ClassVar[str] = "vertical_slash"
    vertical_tokens: int = 1024
    slash_tokens: int = 1024

    # Verticals as single key positions (token columns) instead of column blocks: see VerticalSlashTokens.
    TOKEN_VERTICALS: ClassVar[bool] = False
    # How many windows of LAST_Q queries the estimate reads: 1, the prompt's end (MInference); more, spread over it.
    QUERY_WINDOWS: ClassVar[int] = 1

    def __post_init__(self):  # 0 is allowed: the sink block and the main diagonal are kept anyway
        check_int("vertical_tokens", self.vertical_tokens)
        check_int("slash_tokens", self.slash_tokens)

    def estimate(self, q: torch.Tensor, k: torch.Tensor, block_size: int) -> Estimate:
        est = super().estimate(q, k, block_size)
        scores = spread_vertical_slash_scores(q, k, 1.0 / math.sqrt(q.shape[-1]), block_size, est.n_key_blocks,
                                              self.QUERY_WINDOWS, LAST_Q, columns=self.TOKEN_VERTICALS)
        for name, value in zip(("vertical", "slash", "column"), scores):
            est.scores[name] = value
        return est

    def layout(self, est: Estimate) -> torch.Tensor:
        return self._keep(est, [self] * est.heads)

    @classmethod
    def layout_heads(cls, est: Estimate, strategies) -> torch.Tensor:
        return cls._keep(est, strategies)

    @classmethod
    def _keep(cls, est: Estimate, strategies) -> torch.Tensor:
        """Head ``i`` keeps its top ``strategies[i]`` column blocks (with token verticals: the sink block only) and
        diagonals (one top-k at the largest budget, then each head's first ranks)."""
        n, rows = est.n_key_blocks, est.n_blocks
        if cls.TOKEN_VERTICALS:
            keep_col = (torch.arange(n, device=est.device) == 0).expand(est.batch, est.heads, n)  # the sink block
        else:
            vertical = est.scores["vertical"].clone()
            vertical[..., 0] = float("inf")  # the sink block
            keep_col = _top_ranks(vertical, [min(n, blocks_for(s.vertical_tokens, est.block_size)) for s in strategies])
        slash = est.scores["slash"].clone()
        slash[..., 0] = float("inf")  # the main diagonal
        keep_diag = _top_ranks(slash, [min(n, blocks_for(s.slash_tokens, est.block_size)) for s in strategies])
        q_blk, k_blk = est.block_grid()
        diag_index = (q_blk - k_blk).clamp(min=0).expand(est.batch, est.heads, rows, n)
        on_diag = torch.gather(keep_diag[:, :, None, :].expand(-1, -1, rows, -1), -1, diag_index)
        return keep_col[:, :, None, :] | on_diag

    FRACTIONS: ClassVar[tuple] = (0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3)
    VERTICAL_FRACTIONS: ClassVar[tuple] = FRACTIONS

    @classmethod
    def budget_grid(cls, n_tokens: int, block_size: int) -> list[Strategy]:
        tokens = lambda fractions: sorted({max(block_size, int(math.ceil(f * n_tokens / block_size)) * block_size) for f in fractions})  # noqa: E731
        return [cls(vertical_tokens=v, slash_tokens=s) for v in tokens(cls.VERTICAL_FRACTIONS) for s in tokens(cls.FRACTIONS)]


@register
@dataclass(frozen=True)
class VerticalSlashSpread(VerticalSlash):
    """Vertical-slash estimated from ``SPREAD_WINDOWS`` windows of queries spread evenly over the prompt, the last at
    its end, so the diagonals and columns kept are the prompt's, not only its last sentence's. On eval's passkey
    prompts (repeated filler, then a question) the end-only estimate misses the filler's own diagonals; calibrated at
    72% on SmolLM2 at 8K (H100), the spread estimate left the answer's log-probability −0.46 nats from dense where
    the end-only one left −1.15, and perplexity on three unseen kinds within +2.7% (``benchmarks/RESULTS.md``). The
    estimate costs one launch per window; the attention it lays out costs the same."""

    name: ClassVar[str] = "vertical_slash_spread"
    QUERY_WINDOWS: ClassVar[int] = SPREAD_WINDOWS


@register
@dataclass(frozen=True)
class VerticalSlashTokens(VerticalSlash):
    """Vertical-slash with token-granular verticals: the block layout holds the sink block and the diagonals; the
    ``vertical_tokens`` key positions with the highest vertical scores (outside the sink block) come as columns."""

    name: ClassVar[str] = "vertical_slash_tokens"
    TOKEN_VERTICALS: ClassVar[bool] = True
    # single columns are cheap (1/block_size of a block each): the grid reaches further
    VERTICAL_FRACTIONS: ClassVar[tuple] = (0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45)

    @classmethod
    def columns_heads(cls, est: Estimate, strategies) -> torch.Tensor:
        """Head ``i``'s top ``strategies[i].vertical_tokens`` key positions past the sink block, ascending, as
        (B, h, C) int32 padded with the key count (C: the largest budget)."""
        n, block = est.key_tokens, est.block_size
        budget = [max(0, min(s.vertical_tokens, n - block)) for s in strategies]
        widest = max(budget)
        if widest == 0:
            return torch.full((est.batch, est.heads, 1), n, dtype=torch.int32, device=est.device)
        scores = est.scores["column"].clone()
        scores[..., :block] = -float("inf")  # the sink block is in the layout
        # ranked only where budgets differ (each head then keeps its first ranks); the kept set is sorted by position
        top = scores.topk(widest, dim=-1, sorted=min(budget) < widest).indices.to(torch.int32)
        if min(budget) < widest:
            limit = per_head(budget, est.device)[:, None]
            top = torch.where(torch.arange(widest, device=est.device) < limit, top, n)
        return top.sort(dim=-1).values
