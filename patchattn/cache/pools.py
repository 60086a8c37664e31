"""The pools of one cache layer (:class:`~.layer.BudgetLayer`) and the device's half of a decode step over them.

The pools are sized when the prefill ends, growing heads (``full``, ``snapkv``) with room for ``reserve_tokens`` more
(the generation's ``max_new_tokens`` when :mod:`patchattn.cache_hooks` can see it; else a little headroom). A decode
step then has two halves. The host's, once per layer: count the token off ``room_tokens`` and, only past the reserve,
reallocate (logged). The device's (:meth:`BudgetLayer.decode_step`), a fixed sequence of tensor ops over buffers that
stay put: write the token at each head's slot (a growing head at its valid count, a full window at its ring slot),
fold it into the Quest bounds, advance the counts (``valid_t`` per row and head, ``written_t``: device tensors,
changed in place), build page lists whose width the pool layout fixes, and run the decode op. Nothing in it reads the
host or loops over heads or rows, so ``torch.compile(fullgraph=True)`` traces it and a CUDA graph can replay it.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys

import torch

from ..kernels import decode_function
from ..kernels.cache_write import load_triton_kernel as load_cache_write_kernel
from ..kernels.cache_write import write_token_naive
from ..kernels.sparse_decode.op import sparse_decode_op
from .quest import pick_pages, rebuild_bounds, update_bounds

logger = logging.getLogger(__name__)

FUSED_WRITE_ENV = "PATCHATTN_FUSED_WRITE"  # "0": the token write as the PyTorch reference's launches even on CUDA
GROWTH_TOKENS = 512  # the most headroom a growing head gets when its region is (re)allocated without a reserve
NEVER_FULL = torch.iinfo(torch.int32).max  # a growing head's span: it always takes the next token at its valid count


def headroom_tokens(n_tokens: int, page: int) -> int:
    """Free slots a growing head gets on (re)allocation without a reserve: a 32nd of what it holds, 4 pages to
    GROWTH_TOKENS (a head kept in full then holds at most ~3% more than the dense cache; growing by 512 tokens copies
    the pool once per 512 generated tokens)."""
    return min(GROWTH_TOKENS, max(4 * page, n_tokens // 32))


class HeadPools:
    """The pools and the decode step of :class:`~.layer.BudgetLayer`, which owns the rest (transformers' layer
    contract, what each head keeps of the prompt). Reads the layer's ``plans``, ``policies``, ``page``,
    ``reserve_tokens``, ``quest_heads`` and ``keys`` (None until the prefill ends); :meth:`_allocate` sets the pools
    and every layout tensor a decode step reads."""

    # ---- storage: sized when the prefill ends, regrown only past the reserve ---------------------------
    def _cap(self, h: int, n_tokens: int) -> int:
        """Head ``h``'s region for ``n_tokens`` slots: a window head's is its sinks and window, whatever it holds."""
        return self.policies[h].pool_slots(n_tokens, self.page)

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` more decode tokens in every growing head: when the prefill ends, or now
        (reallocating once) if it has ended."""
        self.reserve_tokens = n_tokens
        if self.keys is not None and n_tokens > self.room_tokens:
            self._grow(n_tokens, headroom=False)
            logger.debug("reserved %d decode tokens: cache pool of %d slots", n_tokens, self.keys.shape[1])

    def _make_room(self, n_tokens: int) -> None:
        """The host's half of writing ``n_tokens``, once per layer: count them off the room, growing the pools first
        when a growing head has no room left (past the reserve)."""
        if n_tokens > self.room_tokens:
            self._grow(n_tokens, headroom=True)
            logger.debug("no room left for decode tokens (reserve_tokens=%s): cache pool grown to %d slots (reallocated; "
                         "reserve more with HeadBudgetCache(reserve_tokens=...))", self.reserve_tokens, self.keys.shape[1])
        self.room_tokens -= n_tokens

    def _grow(self, n_tokens: int, headroom: bool) -> None:
        """Reallocate so that every growing head takes ``n_tokens`` more (and its headroom, when ``headroom``)."""
        valid = self.valid_t.tolist()  # a device read: reallocation only
        caps = [
            max(cap, self._cap(h, v + n_tokens + (headroom_tokens(v, self.page) if headroom else 0)))
            for h, (cap, v) in enumerate(zip(self.caps, map(max, zip(*valid))))
        ]
        self._allocate(caps, valid, self.keys.shape[0], self.keys.shape[-1], self.keys.dtype, self.keys.device)
        self._rebuild_bounds(valid)

    def _allocate(self, caps: list[int], valid: list[list[int]], batch: int, dim: int, dtype, device) -> None:
        """(Re)allocate the pools for ``caps``, copying what each head holds (``valid`` slots per row and head; a
        window head its ring), and set every layout tensor a decode step reads."""
        most = [max(row[h] for row in valid) for h in range(len(caps))]
        offsets = list(itertools.accumulate([0] + caps[:-1]))
        total = sum(caps)
        keys = torch.zeros(batch, total, dim, dtype=dtype, device=device)  # zeros: unwritten slots stay finite
        values = torch.zeros_like(keys)
        positions = torch.full((batch, total), -1, dtype=torch.int32, device=device)  # each slot's token index
        grows = [p.grows for p in self.policies]
        if self.keys is not None:
            for h, growing in enumerate(grows):
                n = most[h] if growing else self.caps[h]
                new, old = slice(offsets[h], offsets[h] + n), slice(self.offsets[h], self.offsets[h] + n)
                keys[:, new], values[:, new], positions[:, new] = self.keys[:, old], self.values[:, old], self.positions[:, old]
        self.keys, self.values, self.positions = keys, values, positions
        self.write_fn = self._write_function()
        self.caps, self.offsets = list(caps), offsets
        self.dtype, self.device = dtype, device
        self.room_tokens = min((c - v for c, v, g in zip(caps, most, grows) if g), default=sys.maxsize)

        as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
        self.valid_t = as_int32(valid)  # (B, Hkv): valid slots of each row's region, from the head's offset
        self.offsets_t = as_int32(offsets)
        rings = [p.ring or (0, 1) for p in self.policies]  # a growing head's ring: never reached
        self.span_t = as_int32([p.span_tokens or NEVER_FULL for p in self.policies])
        self.sink_t = as_int32([sink for sink, _ in rings])
        self.ring_t = as_int32([window for _, window in rings])
        page = self.page
        cap_pages = [c // page for c in caps]
        table = torch.zeros(len(caps), max(cap_pages), dtype=torch.int32)
        for h, (off, n_pages) in enumerate(zip(offsets, cap_pages)):
            table[h, :n_pages] = torch.arange(off // page, off // page + n_pages, dtype=torch.int32)
        self.page_table = table.to(device)  # (Hkv, widest head's pages): each head's pool pages, from its first
        self.read_width = max(cap_pages)  # page lists' width with a query (Quest heads list only their pick)
        if self.quest_heads:
            n_candidates = max(cap_pages[h] for h in self.quest_heads)
            budgets = [self.policies[h].decode_pages for h in self.quest_heads]
            self.quest_heads_t = torch.tensor(self.quest_heads, device=device)
            self.quest_pages_t = self.page_table[self.quest_heads_t, :n_candidates].long()
            self.quest_budget_t = as_int32(budgets)
            self.quest_k = min(max(budgets), n_candidates)
            others = [n for h, n in enumerate(cap_pages) if h not in self.quest_heads]
            self.read_width = max(others + [self.quest_k])
            self.page_min = torch.zeros(batch, total // page, dim, dtype=dtype, device=device)
            self.page_max = torch.zeros_like(self.page_min)

    def _rebuild_bounds(self, valid: list[list[int]]) -> None:
        for h in self.quest_heads:
            n_tokens = [row[h] for row in valid]
            rebuild_bounds(self.keys, self.page_min, self.page_max, self.offsets[h] // self.page, n_tokens, self.page)

    def caps_used(self, h: int) -> int:
        """Slots a window head holds when full (sinks + window); a growing head's capacity."""
        return self.policies[h].capacity(self.caps[h])

    @property
    def valid(self) -> list[int]:
        """Valid slots per head, of the row that holds the most (a device read: for reallocation and inspection,
        never a decode step; ``valid_t`` has every row's)."""
        return self.valid_t.amax(0).tolist() if self.keys is not None else [0] * len(self.plans)

    # ---- the device's half of a decode step ------------------------------------------------------------
    def _write(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write token ``written_t`` (key/value (B, Hkv, D)) into every row's region of every head -- a head still
        filling at the row's valid count, a full window head at the ring slot of the row's own token index (past its
        padding) -- and advance the counts (:mod:`patchattn.kernels.cache_write`). In-place tensor ops only. Returns
        each (row, head)'s page count and read limit after the write."""
        slots, counts, limits = self.write_fn(key, value, self.keys, self.values, self.positions, self.valid_t, self.offsets_t,
                                      self.span_t, self.sink_t, self.ring_t, self.written_t, self.pad_t, self.page)
        if self.quest_heads:
            update_bounds(self.page_min, self.page_max, slots[:, self.quest_heads_t], key[:, self.quest_heads_t], self.page)
        self.written_t.add_(1)
        return counts, limits

    def _write_function(self):
        """The token write for these pools: the one-launch Triton kernel on CUDA (6-14% off a graphed 8B-shaped step,
        H100, benchmarks/RESULTS.md), the PyTorch reference on a CPU, where the kernel does not take the input, or
        under ``PATCHATTN_FUSED_WRITE=0``. Chosen when the pools are allocated, so a decode step (traced or captured)
        only calls it."""
        if self.keys.is_cuda and os.environ.get(FUSED_WRITE_ENV) != "0":
            mod = load_cache_write_kernel()
            if mod is not None and mod.unsupported_reason(self.keys[:, :1], self.keys) is None:
                return mod.write_token_triton
        return write_token_naive

    def page_lists(self, query: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                   limits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(page_ids (B, Hkv, W) int32, page_counts (B, Hkv) int32, limits (B, Hkv) int32) for one decode step, from
        the device counts alone. W is fixed by the pool layout: with ``query`` (B, Hq, D), ``read_width`` (the widest
        non-Quest head's capacity in pages, or the Quest pick), without it every head's capacity (Quest heads then
        read all their pages). Each row's list for a head is ascending, its first ``count`` entries valid; counts and
        limits are the row's own."""
        batch = self.keys.shape[0]
        if counts is None or limits is None:  # (the token write returns both)
            counts = (self.valid_t + (self.page - 1)) // self.page  # (B, Hkv)
            limits = self.offsets_t + self.valid_t
        if query is None or not self.quest_heads:
            return self.page_table.expand(batch, -1, -1), counts, limits
        q = query.view(batch, len(self.plans), -1, query.shape[-1])[:, self.quest_heads_t]  # (B, h, G, D)
        n_pages = counts[:, self.quest_heads_t]
        picked, picked_counts = pick_pages(q, self.page_min, self.page_max, self.quest_pages_t, n_pages, self.quest_budget_t,
                                           self.quest_k)
        ids = self.page_table[:, : self.read_width].expand(batch, -1, -1).clone()
        ids[:, self.quest_heads_t, : self.quest_k] = picked
        counts[:, self.quest_heads_t] = picked_counts
        return ids, counts, limits

    def decode_step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                    backend: str = "auto") -> torch.Tensor:
        """The device's half of one decode token: write ``key``/``value`` (B, Hkv, D), then ``query`` (B, Hq, D)
        attends what each head keeps. Returns (B, Hq, D). The caller has made room (:meth:`_make_room`). ``backend``
        "auto" runs the custom op ``patchattn::sparse_decode`` (one node to ``torch.compile``); "torch" or "triton"
        force an implementation."""
        counts, limits = self._write(key, value)
        ids, counts, limits = self.page_lists(query, counts, limits)
        k_view, v_view = self.pool_views(len(self.plans))
        if backend == "auto":
            return sparse_decode_op(query, k_view, v_view, ids, counts, limits, self.page, scale)
        decode = self._decode_function(query, k_view, v_view, backend)
        return decode(query, k_view, v_view, ids, counts, limits, self.page, scale=scale)

    def _decode_function(self, q, k_view, v_view, backend: str):
        """The decode kernel for this layer's inputs, chosen (and checked) once per backend, dtype and device."""
        key = (backend, q.dtype, q.device, q.shape[1:], k_view.shape[1], k_view.shape[-1])
        if getattr(self, "_decode_key", None) != key:
            self._decode_key, self._decode = key, decode_function(q, k_view, v_view, self.page, backend)
        return self._decode

    def pool_views(self, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pools as (B, Hkv, C, D) views with a zero head stride (what the decode kernel reads)."""
        batch, total, dim = self.keys.shape
        return self.keys[:, None].expand(batch, n_kv_heads, total, dim), self.values[:, None].expand(batch, n_kv_heads, total, dim)
