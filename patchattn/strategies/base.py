"""What every strategy is: a frozen dataclass of budget parameters that turns (q, k) into a block layout.

A strategy splits its work in two so calibration can score many budgets from one look at the data:
``estimate`` computes the budget-independent statistics (block scores, column sums...), ``layout`` turns
them into a layout for this instance's budget. ``block_layout`` does both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..layout import finalize, num_blocks


@dataclass
class Estimate:
    """Budget-independent statistics of one group of heads at one sequence length."""

    batch: int
    heads: int
    n_tokens: int
    block_size: int
    device: torch.device
    scores: dict[str, Any] = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return num_blocks(self.n_tokens, self.block_size)

    def block_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Query-block and key-block indices as broadcastable (n, 1) and (1, n) tensors."""
        idx = torch.arange(self.n_blocks, device=self.device)
        return idx[:, None], idx[None, :]

    def expand(self, keep2d: torch.Tensor) -> torch.Tensor:
        return keep2d.expand(self.batch, self.heads, self.n_blocks, self.n_blocks)


@dataclass(frozen=True)
class Strategy:
    """Base class. Subclasses set ``name`` and add their budget fields (all JSON scalars)."""

    name: ClassVar[str] = ""

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def estimate(self, q: torch.Tensor, k: torch.Tensor, block_size: int) -> Estimate:
        """``q``, ``k``: (B, h, N, D) post-RoPE, k already expanded to the query heads (GQA)."""
        batch, heads, n_tokens, _ = q.shape
        return Estimate(batch, heads, n_tokens, block_size, q.device)

    def layout(self, est: Estimate) -> torch.Tensor:
        """(B, h, n_blocks, n_blocks) bool; finalized (causal, diagonal kept) by the caller."""
        raise NotImplementedError

    def block_layout(self, q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
        est = self.estimate(q, k, block_size)
        return finalize(self.layout(est))

    @classmethod
    def budget_grid(cls, n_tokens: int, block_size: int) -> list["Strategy"]:
        """Instances spanning this strategy's budgets at a calibration length, densest last."""
        return [cls()]


def blocks_for(tokens: int, block_size: int) -> int:
    return max(1, math.ceil(tokens / block_size))


def geometric_tokens(lo: int, hi: int, block_size: int, ratio: float = 1.35) -> list[int]:
    """Block-multiples from ``lo`` to below ``hi`` growing by about ``ratio``."""
    values, x = [], float(max(lo, block_size))
    while x < hi:
        v = int(math.ceil(x / block_size) * block_size)
        if not values or v > values[-1]:
            values.append(v)
        x *= ratio
    return values
