"""Streaming heads (StreamingLLM, DuoAttention): a few sink tokens plus a local window.

Block-granular: a query block reads the key blocks holding the first ``sink_tokens`` and every key block
that any of its tokens could see within ``window_tokens`` back, so the kept set covers the token-level
sink + window pattern. The layout depends only on positions, never on the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Estimate, Strategy, blocks_for, check_int, geometric_tokens, per_head
from .registry import register


@register
@dataclass(frozen=True)
class Streaming(Strategy):
    name: ClassVar[str] = "streaming"
    static: ClassVar[bool] = True
    windowed: ClassVar[bool] = True
    sink_tokens: int = 64
    window_tokens: int = 1024

    def __post_init__(self):
        check_int("sink_tokens", self.sink_tokens)
        check_int("window_tokens", self.window_tokens, minimum=1)

    def layout(self, est: Estimate) -> torch.Tensor:
        q_blk, k_blk = est.block_grid()
        sink_blocks = blocks_for(self.sink_tokens, est.block_size) if self.sink_tokens else 0
        window_blocks = blocks_for(self.window_tokens, est.block_size)
        keep = (k_blk < sink_blocks) | (q_blk - k_blk <= window_blocks)
        return est.expand(keep)

    @classmethod
    def layout_heads(cls, est: Estimate, strategies) -> torch.Tensor:
        q_blk, k_blk = est.block_grid()
        sinks = per_head([blocks_for(s.sink_tokens, est.block_size) if s.sink_tokens else 0 for s in strategies], est.device)
        windows = per_head([blocks_for(s.window_tokens, est.block_size) for s in strategies], est.device)
        keep = (k_blk < sinks[:, None, None]) | (q_blk - k_blk <= windows[:, None, None])
        return keep.expand(est.batch, -1, -1, -1)

    @classmethod
    def budget_grid(cls, n_tokens: int, block_size: int) -> list[Strategy]:
        windows = geometric_tokens(2 * block_size, n_tokens, block_size)
        return [cls(sink_tokens=block_size, window_tokens=w) for w in windows]
