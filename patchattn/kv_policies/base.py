"""What every KV policy is: a frozen dataclass of sizes saying what one KV head of the budgeted cache keeps.

The cache (:mod:`patchattn.cache`) and calibration (:mod:`patchattn.calibrate.kv`) ask the policy, never its name:
which prompt tokens the head keeps when the prefill ends (:meth:`~KVPolicy.keep`) and how many
(:meth:`~KVPolicy.kept_tokens`); whether it grows with every decode token or holds a ring of fixed slots
(:attr:`~KVPolicy.ring`), and which tokens the ring has overwritten by a decode row (:meth:`~KVPolicy.evicted`); the
slots of its pool region (:meth:`~KVPolicy.pool_slots`) and its bytes (:meth:`~KVPolicy.kv_bytes`); the budgets
calibration tries (:meth:`~KVPolicy.candidates`). ``decode_pages`` > 0: each decode step reads only that many of the
head's pages, those whose key bounds promise the largest scores (Quest, :mod:`patchattn.cache.quest`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..checks import check_int


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``, at least one multiple (a head's region is whole pages)."""
    return max(multiple, (n + multiple - 1) // multiple * multiple)


@dataclass(frozen=True)
class KVPolicy:
    """Base class. Its rules default to a head that keeps every prompt token and grows by every decode token; it
    ``compresses`` unless a policy says otherwise. Subclasses set ``name`` and add their size fields (named as in a
    recipe's KV plan), checked in ``__post_init__`` with the messages a recipe shows."""

    name: ClassVar[str] = ""
    reads_pages: ClassVar[bool] = True  # whether decode_pages may be set
    decode_pages: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_int(f.name, getattr(self, f.name))

    @property
    def compresses(self) -> bool:
        """Whether this head keeps or reads less than the full cache."""
        return True

    def kept_tokens(self, n_tokens: int) -> int:
        """Prompt tokens this head holds after a prefill of ``n_tokens``."""
        return n_tokens

    def votes_needed(self, n_tokens: int) -> tuple[int, int] | None:
        """(observation window, tokens to rank) when :meth:`keep` ranks a prefill of ``n_tokens`` by the votes of its
        last queries (SnapKV); None when it keeps by position alone."""
        return None

    def keep(self, n_tokens: int, device, ranked: torch.Tensor | None = None) -> torch.Tensor:
        """The keep rule: indices of the prompt tokens this head keeps when a prefill of ``n_tokens`` ends, ascending
        ((T,) long, or (..., T) when ``ranked`` (..., K) holds, best first, the tokens the votes of
        :meth:`votes_needed` rank highest; None: no queries voted)."""
        return torch.arange(n_tokens, device=device)

    # ---- the head's region of the pool -------------------------------------------------------------
    @property
    def ring(self) -> tuple[int, int] | None:
        """(sink slots, ring slots) of a head that holds a fixed span for ever, each decode token overwriting the
        oldest non-sink one (:func:`ring_slot`); None for a head that grows with every decode token."""
        return None

    @property
    def grows(self) -> bool:
        return self.ring is None

    @property
    def span_tokens(self) -> int | None:
        """The slots a ring head holds for ever (sinks and ring); None for a growing head."""
        return None if self.ring is None else sum(self.ring)

    def capacity(self, n_tokens: int) -> int:
        """Slots this head needs to hold ``n_tokens`` tokens (a ring: its span, whatever it holds)."""
        return n_tokens if self.ring is None else self.span_tokens

    def pool_slots(self, n_tokens: int, page_tokens: int) -> int:
        """The head's pool region for ``n_tokens`` tokens: :meth:`capacity` in whole pages."""
        return round_up(self.capacity(n_tokens), page_tokens)

    def prompt_slots(self, n_tokens: int, count: int, device) -> torch.Tensor:
        """Slots, from the region's start, of the ``count`` prompt tokens :meth:`keep` returns for a prefill of
        ``n_tokens``: in order (a full ring puts its window where :func:`ring_slot` would have)."""
        return torch.arange(count, device=device)

    def evicted(self, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """Which ``positions`` (N,) the head no longer holds once token ``rows`` (R,) is written: (R, N) bool, or
        None when it evicts nothing during decode."""
        return None

    def kv_bytes(self, n_tokens: int, reserve_tokens: int, page_tokens: int, token_bytes: int) -> int:
        """Bytes of this head's region after a prefill of ``n_tokens`` with room for ``reserve_tokens`` decode tokens:
        keys and values of its :meth:`pool_slots`, and a Quest head's page bounds (a min and a max key a page; a layer
        with any Quest head bounds every page of its pool). ``token_bytes``: one key of every batch row (B * D *
        element size)."""
        slots = self.pool_slots(self.kept_tokens(n_tokens) + reserve_tokens, page_tokens)
        bounds = slots // page_tokens if self.decode_pages else 0
        return 2 * token_bytes * (slots + bounds)

    # ---- calibration -----------------------------------------------------------------------------------
    @classmethod
    def candidates(cls, prompt_tokens: int, sizes: list[int], obs_tokens: int) -> list["KVPolicy"]:
        """The budgets calibration scores on a prompt of ``prompt_tokens``, from the shared ladder of token ``sizes``
        (``obs_tokens``: SnapKV's observation window)."""
        return [cls()]


def ring_slot(tokens, sink_tokens, window_tokens):
    """Slot, from a ring head's region start, of token ``tokens`` once its ring is full (ints or tensors, per head):
    the sinks stay put, later tokens take turns in the ``window_tokens`` slots after them."""
    return sink_tokens + (tokens - sink_tokens) % window_tokens
