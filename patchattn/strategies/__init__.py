"""Sparse-attention strategies, each a small dataclass in one registry."""

from .base import Estimate, Strategy
from .block_topk import BlockTopK
from .dense import Dense
from .registry import STRATEGIES, get_strategy, register
from .streaming import Streaming
from .vertical_slash import VerticalSlash, VerticalSlashSpread, VerticalSlashTokens
from .vertical_slash_adaptive import VerticalSlashAdaptive
from .vertical_slash_topk import VerticalSlashTopK

__all__ = [
    "STRATEGIES",
    "BlockTopK",
    "Dense",
    "Estimate",
    "Strategy",
    "Streaming",
    "VerticalSlash",
    "VerticalSlashAdaptive",
    "VerticalSlashSpread",
    "VerticalSlashTokens",
    "VerticalSlashTopK",
    "get_strategy",
    "register",
]
