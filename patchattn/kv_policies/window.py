"""Window heads (StreamingLLM, DuoAttention's streaming heads): the first ``sink_tokens`` and a rolling window of the
last ``window_tokens``, in a ring of ``sink_tokens + window_tokens`` slots: memory stays constant while decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import KVPolicy, ring_slot
from .registry import register

SINK_TOKENS = 64  # the sinks of the windows calibration tries


@register
@dataclass(frozen=True)
class Window(KVPolicy):
    name: ClassVar[str] = "window"
    reads_pages: ClassVar[bool] = False
    sink_tokens: int = 0
    window_tokens: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.window_tokens < 1:
            raise ValueError("a window KV plan needs window_tokens >= 1")
        if self.decode_pages:
            raise ValueError("decode_pages applies to full and snapkv KV plans, not window")

    def kept_tokens(self, n_tokens: int) -> int:
        return min(n_tokens, self.sink_tokens + self.window_tokens)

    def keep(self, n_tokens: int, device, ranked: torch.Tensor | None = None) -> torch.Tensor:
        sink, window = self.sink_tokens, self.window_tokens
        if n_tokens <= sink + window:
            return torch.arange(n_tokens, device=device)
        return torch.cat([torch.arange(sink, device=device), torch.arange(n_tokens - window, n_tokens, device=device)])

    @property
    def ring(self) -> tuple[int, int]:
        return self.sink_tokens, self.window_tokens

    def prompt_slots(self, n_tokens: int, count: int, device) -> torch.Tensor:
        local = torch.arange(count, device=device)
        sink, window = self.sink_tokens, self.window_tokens
        if n_tokens > sink + window:
            local[sink:] = ring_slot(torch.arange(n_tokens - window, n_tokens, device=device), sink, window)
        return local

    def evicted(self, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Past the sinks, every token more than ``window_tokens`` back: its ring slot has been written again."""
        return (positions[None, :] >= self.sink_tokens) & (positions[None, :] <= rows[:, None] - self.window_tokens)

    @classmethod
    def candidates(cls, prompt_tokens: int, sizes: list[int], obs_tokens: int) -> list[KVPolicy]:
        return [cls(sink_tokens=SINK_TOKENS, window_tokens=s) for s in sizes if SINK_TOKENS + s < prompt_tokens]
