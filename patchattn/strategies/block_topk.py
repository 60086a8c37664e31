"""Block top-k with an adaptive mass threshold (FlexPrefill, XAttention, SpargeAttn).

Queries and keys are mean-pooled per block; the softmax of the pooled scores over causal key blocks
estimates each block's share of the row's attention. A query block keeps its highest-scoring key blocks
until their estimated mass reaches ``threshold`` — so the density adapts to each head and each input —
plus the sink block and the diagonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scores import grouped_scores
from .base import Estimate, Strategy, check_number, per_head
from .registry import register


def _mean_pool(x: torch.Tensor, block_size: int, n_blocks: int) -> torch.Tensor:
    n = x.shape[2]
    full = n // block_size  # whole blocks: summed in place with a float32 accumulator (no float32 copy of x)
    summed = x[:, :, : full * block_size].unflatten(2, (full, block_size)).sum(-2, dtype=torch.float32)
    if full < n_blocks:  # the short last block
        summed = torch.cat([summed, x[:, :, full * block_size :].sum(-2, keepdim=True, dtype=torch.float32)], dim=2)
    # Tokens per block (the last may be short), built on the device: setting one element from a Python number
    # would copy it from the host and synchronise, once per layer.
    counts = (n - torch.arange(n_blocks, device=x.device, dtype=torch.float32) * block_size).clamp_(max=block_size)
    return summed / counts[:, None]


@register
@dataclass(frozen=True)
class BlockTopK(Strategy):
    name: ClassVar[str] = "block_topk"
    threshold: float = 0.9

    def __post_init__(self):
        check_number("threshold", self.threshold, 0.0, 1.0, low_open=True)

    def estimate(self, q: torch.Tensor, k: torch.Tensor, block_size: int) -> Estimate:
        est = super().estimate(q, k, block_size)
        q_pool, k_pool = _mean_pool(q, block_size, est.n_blocks), _mean_pool(k, block_size, est.n_key_blocks)
        scores = grouped_scores(q_pool, k_pool, 1.0 / math.sqrt(q.shape[-1]))
        q_blk, k_blk = est.block_grid()
        probs = torch.softmax(scores.masked_fill_(k_blk > q_blk, float("-inf")), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        est.scores["order"] = order
        est.scores["mass_before"] = sorted_probs.cumsum(-1) - sorted_probs  # mass of the blocks ranked above
        return est

    def layout(self, est: Estimate) -> torch.Tensor:
        return self._keep(est, self.threshold)

    @classmethod
    def layout_heads(cls, est: Estimate, strategies) -> torch.Tensor:
        thresholds = per_head([s.threshold for s in strategies], est.device, est.scores["mass_before"].dtype)
        return cls._keep(est, thresholds[:, None, None])

    @staticmethod
    def _keep(est: Estimate, threshold) -> torch.Tensor:
        keep_sorted = est.scores["mass_before"] < threshold
        keep = torch.zeros_like(keep_sorted)
        keep.scatter_(-1, est.scores["order"], keep_sorted)
        keep[..., 0] = True  # the sink block
        return keep

    @classmethod
    def budget_grid(cls, n_tokens: int, block_size: int) -> list[Strategy]:
        return [cls(threshold=t) for t in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)]
