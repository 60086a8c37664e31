"""Vertical-slash whose budget is attention mass, not a count, so the density follows the prompt (as FlexPrefill's
query-aware heads do).

The estimate is token vertical-slash's: the attention of the last 64 queries per key position (columns) and per
block of diagonals (slashes). Each head then keeps the fewest of its top-ranked diagonals and single key columns,
ranked together by the attention each holds, that cover ``mass`` of that attention. The main diagonal and the sink
block are always kept. The counts are capped at ``vertical_tokens`` columns and ``slash_tokens`` worth of diagonals. A prompt whose
attention is spread (code, tables, retrieval) gets more columns and diagonals; a local one gets fewer. The budget the
recipe fixes is the share of attention kept, not the number of blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Estimate, blocks_for, check_number, per_head
from .registry import register
from .vertical_slash import VerticalSlashTokens


def _select(est: Estimate, strategies) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each head's diagonals and columns, chosen together: the top-ranked of both (by the attention each holds), merged
    by attention per block computed (a diagonal at block offset ``o`` costs ``n - o`` blocks, a column at key block
    ``j`` costs ``(n - j) / block_size``: the query blocks after it), taken until ``mass`` of the last queries'
    attention is covered (the sink block's share counted as covered), each list within its cap. Returns (diagonal block offsets (B, h, S), kept (B, h, S) bool, key positions (B, h, C),
    kept (B, h, C) bool); S and C are the largest caps. On the device: no host sync."""
    n, block = est.n_key_blocks, est.block_size
    slash, column = est.scores["slash"], est.scores["column"]  # (B, h, n) per block of offsets, (B, h, N) per key
    slash_caps = [min(n, blocks_for(s.slash_tokens, block)) for s in strategies]
    col_caps = [max(1, min(s.vertical_tokens, est.key_tokens - block)) for s in strategies]
    ordering = slash.clone()
    ordering[..., 0] = float("inf")  # the main diagonal first, whatever it holds
    offsets = ordering.topk(max(slash_caps), dim=-1).indices
    slash_values = slash.gather(-1, offsets)
    masked = column.clone()
    masked[..., :block] = -float("inf")  # the sink block is always in the layout
    col_values, positions = masked.topk(min(max(col_caps), masked.shape[-1]), dim=-1)
    # ranks past a head's own cap take no part
    slash_values = slash_values.masked_fill(torch.arange(offsets.shape[-1], device=est.device) >= per_head(slash_caps, est.device)[:, None], -1.0)
    col_values = col_values.masked_fill(torch.arange(positions.shape[-1], device=est.device) >= per_head(col_caps, est.device)[:, None], -1.0)
    slash_cost = (n - offsets).to(slash.dtype)
    col_cost = (n - torch.div(positions, block, rounding_mode="floor")).to(column.dtype) / block
    value_per_cost = torch.cat([slash_values / slash_cost, col_values / col_cost], dim=-1)
    value_per_cost[..., 0] = float("inf")  # the main diagonal first
    order = value_per_cost.argsort(dim=-1, descending=True)
    ranked = torch.cat([slash_values, col_values], dim=-1).gather(-1, order)
    held = ranked.clamp(min=0.0)
    total = column.sum(-1)
    mass = per_head([s.mass for s in strategies], est.device, column.dtype)
    need = mass * total - column[..., :block].sum(-1)
    before = held.cumsum(-1) - held
    kept_ranked = (before < need[..., None] - 1e-6 * total[..., None]) & (ranked >= 0)
    kept_ranked[..., 0] = True
    kept = torch.zeros_like(kept_ranked).scatter_(-1, order, kept_ranked)
    return offsets, kept[..., : offsets.shape[-1]], positions, kept[..., offsets.shape[-1] :]


@register
@dataclass(frozen=True)
class VerticalSlashAdaptive(VerticalSlashTokens):
    """Token vertical-slash with ``mass`` as its budget; ``vertical_tokens`` and ``slash_tokens`` are caps."""

    name: ClassVar[str] = "vertical_slash_adaptive"
    vertical_tokens: int = 4096
    slash_tokens: int = 4096
    mass: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        check_number("mass", self.mass, 0.0, 1.0, low_open=True)

    @classmethod
    def _keep(cls, est: Estimate, strategies) -> torch.Tensor:
        """The sink block plus each head's chosen diagonals (:func:`_select`)."""
        n, rows = est.n_key_blocks, est.n_blocks
        offsets, kept, _, _ = _select(est, strategies)
        keep_diag = torch.zeros(est.batch, est.heads, n, dtype=torch.bool, device=est.device).scatter_(-1, offsets, kept)
        q_blk, k_blk = est.block_grid()
        diag_index = (q_blk - k_blk).clamp(min=0).expand(est.batch, est.heads, rows, n)
        on_diag = torch.gather(keep_diag[:, :, None, :].expand(-1, -1, rows, -1), -1, diag_index)
        return on_diag | (torch.arange(n, device=est.device) == 0)[None, None, None, :]

    @classmethod
    def columns_heads(cls, est: Estimate, strategies) -> torch.Tensor:
        """Each head's chosen key positions past the sink block (:func:`_select`), ascending, padded with
        the key count."""
        n = est.key_tokens
        if n <= est.block_size:
            return torch.full((est.batch, est.heads, 1), n, dtype=torch.int32, device=est.device)
        _, _, positions, kept = _select(est, strategies)
        return torch.where(kept, positions, n).to(torch.int32).sort(dim=-1).values

    MASSES: ClassVar[tuple] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
    CAP_FRACTIONS: ClassVar[tuple] = (0.1, 0.3)  # caps on columns and on diagonals, as shares of the tokens

    @classmethod
    def budget_grid(cls, n_tokens: int, block_size: int) -> list:
        cap = lambda f: max(block_size, int(math.ceil(f * n_tokens / block_size)) * block_size)  # noqa: E731
        return [cls(vertical_tokens=cap(f), slash_tokens=cap(f), mass=m) for f in cls.CAP_FRACTIONS for m in cls.MASSES]
