"""Dense causal attention: every causal block. The baseline, and what a head keeps when it needs all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Estimate, Strategy
from .registry import register


@register
@dataclass(frozen=True)
class Dense(Strategy):
    name: ClassVar[str] = "dense"
    static: ClassVar[bool] = True

    def layout(self, est: Estimate) -> torch.Tensor:
        return est.expand(torch.ones(est.n_blocks, est.n_key_blocks, dtype=torch.bool, device=est.device))
