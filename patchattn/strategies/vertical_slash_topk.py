"""Spread vertical-slash and block top-k in one head: the head reads every block either layout keeps.

Some heads do two jobs. On SmolLM2 at 8K (CPU, float32, 2026-12-07) three heads of layers 17-20 were spread
vertical-slash heads in the five-kind 72% recipe, with diagonals 2,496 tokens wide: given block top-k instead (what a
recipe gets where vertical-slash is kept out of those layers so the passkey holds), perplexity on the unseen email rose
from +2.8% to +5.1%; given both layouts, +2.6%. Quoted replies are copied from a few thousand tokens back, which the
wide diagonals cover whatever the estimate says; a needle sits anywhere, which block top-k's mass estimate reaches
and the vertical-slash estimate (read where the prompt is filler) does not. The two estimates are computed once
each; the layout is their union, so the head costs about the larger of the two plus what only the other keeps.
Offered with ``calibrate --strategies ...,vertical_slash_topk`` (not by default: its grid is three times spread
vertical-slash's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Estimate, Strategy, check_number, per_head
from .block_topk import BlockTopK
from .registry import register
from .vertical_slash import VerticalSlashSpread


@register
@dataclass(frozen=True)
class VerticalSlashTopK(VerticalSlashSpread):
    name: ClassVar[str] = "vertical_slash_topk"
    threshold: float = 0.8

    THRESHOLDS: ClassVar[tuple] = (0.5, 0.8, 0.95)

    def __post_init__(self):
        super().__post_init__()
        check_number("threshold", self.threshold, 0.0, 1.0, low_open=True)

    def estimate(self, q, k, block_size: int) -> Estimate:
        est = super().estimate(q, k, block_size)
        est.scores.update(BlockTopK(self.threshold).estimate(q, k, block_size).scores)
        return est

    @classmethod
    def _keep(cls, est: Estimate, strategies):
        thresholds = per_head([s.threshold for s in strategies], est.device, est.scores["mass_before"].dtype)
        return super()._keep(est, strategies) | BlockTopK._keep(est, thresholds[:, None, None])

    @classmethod
    def budget_grid(cls, n_tokens: int, block_size: int) -> list[Strategy]:
        slash = VerticalSlashSpread.budget_grid(n_tokens, block_size)
        return [cls(s.vertical_tokens, s.slash_tokens, t) for t in cls.THRESHOLDS for s in slash]
