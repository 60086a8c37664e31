"""What every strategy is: a frozen dataclass of budget parameters that turns (q, k) into a block layout.

A strategy splits its work in two so calibration can score many budgets from one look at the data:
``estimate`` computes the budget-independent statistics (block scores, column sums...), ``layout`` turns
them into a layout for this instance's budget. ``block_layout`` does both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..layout import finalize, num_blocks

from ..checks import MAX_TOKENS, check_int, check_number, shown  # noqa: F401  (the strategies check with these)


@dataclass
class Estimate:
    """Budget-independent statistics of one group of heads at one sequence length: ``n_tokens`` queries against
    ``key_tokens`` keys. A prefill is square; a chunk of a prompt prefilled in chunks has its queries at the last
    ``n_tokens`` of the keys' positions (block-aligned), so its layout is the (n_blocks, n_key_blocks) rows of the
    square one that the chunk's query blocks are."""

    batch: int
    heads: int
    n_tokens: int
    block_size: int
    device: torch.device
    scores: dict[str, Any] = field(default_factory=dict)
    n_keys: int | None = None  # None: as many keys as queries

    @property
    def key_tokens(self) -> int:
        return self.n_tokens if self.n_keys is None else self.n_keys

    @property
    def n_blocks(self) -> int:
        """Query blocks."""
        return num_blocks(self.n_tokens, self.block_size)

    @property
    def n_key_blocks(self) -> int:
        return num_blocks(self.key_tokens, self.block_size)

    def block_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Query-block (by position: a chunk's first is past the keys before it) and key-block indices as
        broadcastable (n, 1) and (1, n_keys) tensors."""
        offset = (self.key_tokens - self.n_tokens) // self.block_size
        return (torch.arange(self.n_blocks, device=self.device) + offset)[:, None], torch.arange(self.n_key_blocks, device=self.device)[None, :]

    def expand(self, keep2d: torch.Tensor) -> torch.Tensor:
        return keep2d.expand(self.batch, self.heads, self.n_blocks, self.n_key_blocks)


@dataclass(frozen=True)
class Strategy:
    """Base class. Subclasses set ``name`` and add their budget fields (all JSON scalars), checked in their
    ``__post_init__`` with :func:`check_int` / :func:`check_number` so every way to build one refuses a bad budget."""

    name: ClassVar[str] = ""
    # Whether the layout depends on positions alone, never on the data: a layer of such heads builds it once per
    # prompt shape (patchattn.prefill caches it).
    static: ClassVar[bool] = False
    # Whether the head reads only its sinks and a fixed window back from each query, whatever the prompt (and, at
    # decode, keeps no more of the cache): what lies further back is out of its reach. Calibration keeps such a
    # budget off the heads a needle's answer reads from far back (patchattn.calibrate.retrieval).
    windowed: ClassVar[bool] = False

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def estimate(self, q: torch.Tensor, k: torch.Tensor, block_size: int) -> Estimate:
        """``q`` (B, h, N, D) and ``k`` (B, h_kv, N, D), post-RoPE; h a multiple of h_kv: query head ``i`` reads key
        head ``i // (h // h_kv)`` (GQA, never expanded here; a caller may also pass keys expanded to h heads)."""
        batch, heads, n_tokens, _ = q.shape
        return Estimate(batch, heads, n_tokens, block_size, q.device, n_keys=None if k.shape[2] == n_tokens else k.shape[2])

    def layout(self, est: Estimate) -> torch.Tensor:
        """(B, h, n_blocks, n_key_blocks) bool; finalized (causal, diagonal kept) by the caller."""
        raise NotImplementedError

    def block_layout(self, q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
        est = self.estimate(q, k, block_size)
        return finalize(self.layout(est))

    @classmethod
    def layout_heads(cls, est: Estimate, strategies: Sequence["Strategy"]) -> torch.Tensor:
        """The layout of ``est``'s heads when head ``i`` runs ``strategies[i]`` (all of this class, one shared
        estimate): what a layer with per-head budgets needs. This default runs :meth:`layout` once per distinct
        budget; strategies override it with one vectorized pass whose budgets are per-head tensors."""
        if len(strategies) != est.heads:
            raise ValueError(f"{len(strategies)} strategies for {est.heads} heads")
        distinct = list(dict.fromkeys(strategies))
        if len(distinct) == 1:
            return distinct[0].layout(est)
        keep = torch.empty(est.batch, est.heads, est.n_blocks, est.n_key_blocks, dtype=torch.bool, device=est.device)
        for strategy in distinct:  # integer head indices: a boolean mask index would synchronise on CUDA
            heads = per_head([i for i, s in enumerate(strategies) if s == strategy], est.device)
            keep[:, heads] = strategy.layout(est)[:, heads]
        return keep

    def columns(self, est: Estimate) -> torch.Tensor | None:
        return type(self).columns_heads(est, [self] * est.heads)

    @classmethod
    def columns_heads(cls, est: Estimate, strategies: Sequence["Strategy"]) -> torch.Tensor | None:
        """Single key positions each head reads besides its block layout, by every query block that starts after
        them: (B, h, C) int32, ascending, padded with ``est.key_tokens``; None for strategies that read whole blocks
        only (all but token-granular vertical-slash). See :func:`patchattn.layout.column_counts`."""
        return None

    @classmethod
    def budget_grid(cls, n_tokens: int, block_size: int) -> list["Strategy"]:
        """Instances spanning this strategy's budgets at a calibration length, densest last."""
        return [cls()]


@functools.lru_cache(maxsize=4096)
def _per_head(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, device=device, dtype=dtype)


def per_head(values: Sequence, device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A small per-head parameter tensor on ``device``, built once per distinct value list (layouts are built
    every prefill of every layer; the host-to-device copy is not)."""
    return _per_head(tuple(values), torch.device(device), dtype)


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
