"""One layer of the head-budgeted KV cache: its pools, where each head's tokens go, and transformers' layer contract.

A layer holds one key pool and one value pool of shape (B, C, D). KV head ``h`` owns the page-aligned region
``[offset_h, offset_h + cap_h)``, so a head's memory is its own budget, not the longest head's. Each head's
:mod:`KV policy <patchattn.kv_policies>` says what it keeps and how its region fills: a ``window`` head (sinks +
rolling window, StreamingLLM) holds ``sink + window`` slots for ever, a ``snapkv`` head the prompt tokens chosen after
prefill plus what is generated, a ``full`` head everything. Inside its region a head's valid slots are one
run from the offset, so the decode kernel reads every head from the same pool (a zero head stride) with per-head page
lists and limits (:func:`patchattn.kernels.sparse_decode`); Quest heads read their best pages (:mod:`.quest`).

Rows of a batch may differ in length: a left-padded batch (``generate``'s, for prompts of different lengths) tells the
layer each row's pad tokens before the prefill (:meth:`BudgetLayer.set_left_padding`). A row's region then holds its
real tokens alone, laid out as if the row ran by itself: its keep rules see only its real tokens (the sinks are its
first real ones, SnapKV votes among them, Quest's first page starts at them), and its counts, ring slots and limits
are its own, per (row, head) on the device. A region is sized for the row that holds the most.

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
import math
import sys

import torch
from transformers.cache_utils import DynamicLayer

from ..kernels import decode_function
from ..kernels.sparse_decode.op import sparse_decode_op
from ..kv_policies import ring_slot
from ..recipe import KVPlan
from .plans import kept_prompt_tokens
from .quest import pick_pages, rebuild_bounds, update_bounds

logger = logging.getLogger(__name__)

PAGE_TOKENS = 16  # cache page: the unit of the decode kernel's lists and of Quest's key bounds
GROWTH_TOKENS = 512  # the most headroom a growing head gets when its region is (re)allocated without a reserve
NEVER_FULL = torch.iinfo(torch.int32).max  # a growing head's span: it always takes the next token at its valid count


def _runs_of_equal_padding(pads: list[int]) -> list[tuple[int, slice]]:
    """(pad, rows) of each run of neighbouring rows with the same left padding: slices, so that a run's prompt is a
    view (an unpadded batch is one run of every row)."""
    runs, start = [], 0
    for pad, rows in itertools.groupby(pads):
        stop = start + len(list(rows))
        runs.append((pad, slice(start, stop)))
        start = stop
    return runs


def _headroom(n_tokens: int, page: int) -> int:
    """Free slots a growing head gets on (re)allocation without a reserve: a 32nd of what it holds, 4 pages to
    GROWTH_TOKENS (a head kept in full then holds at most ~3% more than the dense cache; growing by 512 tokens copies
    the pool once per 512 generated tokens)."""
    return min(GROWTH_TOKENS, max(4 * page, n_tokens // 32))


class BudgetLayer(DynamicLayer):
    """One layer's pooled, head-budgeted cache (see the module docstring). ``reserve_tokens``: decode tokens every
    growing head has room for when the prefill ends (None: a little headroom, see :func:`_headroom`)."""

    is_croppable = False

    def __init__(self, plans: list[KVPlan], page_tokens: int = PAGE_TOKENS, reserve_tokens: int | None = None):
        super().__init__()
        self.plans = plans
        self.policies = [p.build() for p in plans]  # what each head keeps: the cache asks these, never the names
        self.page = page_tokens
        self.reserve_tokens = reserve_tokens
        self.seen = 0  # tokens this layer has been given (the logical sequence length)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the prompt, until finish_prefill
        self.incoming: tuple[torch.Tensor, torch.Tensor] | None = None  # a step's new tokens, until attend
        self.pad_tokens: list[int] | None = None  # per row, pad tokens left of its prompt (None: unpadded)
        self.caps = [0] * len(plans)  # each head's region: host lists, changed only when the pools are (re)allocated
        self.offsets = [0] * len(plans)
        self.room_tokens = 0  # tokens every growing head can still take before the pools must grow
        self.quest_heads = [h for h, p in enumerate(self.policies) if p.decode_pages > 0]
        self.page_min = self.page_max = None

    # ---- transformers' layer contract --------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Take the new tokens. The prompt is held until :meth:`finish_prefill`; later tokens wait in
        ``incoming`` until :meth:`attend` writes them (one at a time, the same as token-by-token decoding)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[-2]
        if self.keys is None:  # the prompt (or more of it, before it was compressed)
            if self.pending is not None:
                key_states = torch.cat([self.pending[0], key_states], dim=-2)
                value_states = torch.cat([self.pending[1], value_states], dim=-2)
            self.pending = (key_states, value_states)
            self.seen += n_new
            return key_states, value_states
        if self.incoming is not None:  # nobody attended the last step's tokens: store them first
            self._append(*self.incoming)
        self.incoming = (key_states, value_states)
        self.seen += n_new
        return key_states, value_states

    def attend(self, query: torch.Tensor, scale: float | None, backend: str = "auto") -> torch.Tensor:
        """Attention of the ``incoming`` tokens' queries (B, Hq, n, D) over what each head keeps, each new token
        written before its own query reads. Returns (B, n, Hq, D)."""
        key_states, value_states = self.incoming
        self.incoming = None
        outs = []
        for i in range(query.shape[2]):
            self._make_room(1)
            outs.append(self.decode_step(query[:, :, i], key_states[:, :, i], value_states[:, :, i], scale, backend))
        return outs[0][:, None] if len(outs) == 1 else torch.stack(outs, dim=1)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.seen + n, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.plans, self.page, self.reserve_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows in place (the pools stay the same buffers)."""
        if self.pending is not None:
            self.pending = tuple(t.index_select(0, beam_idx.to(t.device)) for t in self.pending)
            if self.pad_tokens is not None:
                self.pad_tokens = [self.pad_tokens[i] for i in beam_idx.tolist()]
        if self.keys is not None:
            for t in (self.keys, self.values, self.positions, self.page_min, self.page_max, self.valid_t, self.pad_t):
                if t is not None:
                    t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the head-budgeted cache cannot be cropped (evicted tokens are gone)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the head-budgeted cache does not support batch expansion")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the head-budgeted cache does not support batch selection")

    # ---- prefill: choose what each head keeps, size the pools ----------------------------------------
    def set_left_padding(self, pad_tokens: list[int] | None) -> None:
        """Before the prefill: each row's pad tokens on the left of its prompt (None or zeros: unpadded). Pad tokens
        are never kept; each row keeps, counts and evicts among its own real tokens (see the module docstring)."""
        if self.seen:
            raise RuntimeError("set the left padding before the prefill: this layer already holds tokens")
        self.pad_tokens = list(pad_tokens) if pad_tokens is not None and any(pad_tokens) else None

    def finish_prefill(self, query: torch.Tensor | None = None, scale: float | None = None) -> None:
        """Compress the pending prompt into the pool (``query`` (B, Hq, N, D) post-RoPE, for SnapKV). Rows with the
        same left padding, next to each other, choose together (a batch of one length: one choice for all rows)."""
        if self.pending is None:
            return
        key, value = self.pending
        self.pending = None
        batch, n_kv, n, dim = key.shape
        scale = scale if scale is not None else 1.0 / math.sqrt(dim)
        pads = self.pad_tokens or [0] * batch
        if len(pads) != batch or max(pads) > n:
            raise ValueError(f"left padding {pads} does not fit a batch of {batch} rows of {n} tokens")
        runs = _runs_of_equal_padding(pads)
        keeps = []  # per run, per head: indices among the run's real tokens, (rows, T) or (T,)
        counts = [[0] * n_kv for _ in range(batch)]  # per row and head: prompt tokens kept
        for pad, rows in runs:
            q = query[rows, :, pad:] if query is not None else None
            keeps.append(kept_prompt_tokens(self.policies, q, key[rows, :, pad:], scale))
            counts[rows] = [[k.shape[-1] for k in keeps[-1]]] * (rows.stop - rows.start)
        most = [max(row[h] for row in counts) for h in range(n_kv)]
        extra = [self.reserve_tokens if self.reserve_tokens is not None else _headroom(c, self.page) for c in most]
        caps = [self._cap(h, c + e) for h, (c, e) in enumerate(zip(most, extra))]
        self._allocate(caps, counts, batch, dim, key.dtype, key.device)
        for (pad, rows), keep in zip(runs, keeps):
            for h, idx in enumerate(keep):
                idx_b = idx.expand(rows.stop - rows.start, -1) if idx.dim() == 1 else idx
                gather = idx_b[..., None].expand(-1, -1, dim)
                slots = self._prompt_slots(h, n - pad, idx_b.shape[-1])
                self.keys[rows, slots] = torch.gather(key[rows, h, pad:], 1, gather)
                self.values[rows, slots] = torch.gather(value[rows, h, pad:], 1, gather)
                self.positions[rows, slots] = (idx_b + pad).to(torch.int32)
        self.written_t = torch.tensor(n, dtype=torch.int32, device=key.device)  # the next token's index
        self.pad_t = torch.tensor(pads, dtype=torch.int32, device=key.device)[:, None]  # (B, 1)
        self._rebuild_bounds(counts)

    def _cap(self, h: int, n_tokens: int) -> int:
        """Head ``h``'s region for ``n_tokens`` slots: a window head's is its sinks and window, whatever it holds."""
        return self.policies[h].pool_slots(n_tokens, self.page)

    def _prompt_slots(self, h: int, n: int, count: int) -> torch.Tensor:
        """Pool slots of head ``h``'s kept prompt tokens: in order, except a full window head, whose window
        tokens sit where the ring formula of :meth:`_write` puts them."""
        return self.offsets[h] + self.policies[h].prompt_slots(n, count, self.keys.device)

    # ---- storage: sized when the prefill ends, regrown only past the reserve ---------------------------
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
            max(cap, self._cap(h, v + n_tokens + (_headroom(v, self.page) if headroom else 0)))
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

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write tokens that no query attends (key/value (B, Hkv, n, D)), finishing a prefill nobody finished."""
        if self.pending is not None:
            self.finish_prefill()
        self._make_room(key_states.shape[-2])
        for i in range(key_states.shape[-2]):
            self._write(key_states[:, :, i], value_states[:, :, i])

    # ---- the device's half of a decode step ------------------------------------------------------------
    def _write(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write token ``written_t`` (key/value (B, Hkv, D)) into every row's region of every head -- a head still
        filling at the row's valid count, a full window head at the ring slot of the row's own token index (past its
        padding) -- and advance the counts. In-place tensor ops only."""
        t = self.written_t
        filling = self.valid_t < self.span_t  # (B, Hkv)
        ring = ring_slot(t - self.pad_t, self.sink_t, self.ring_t)
        slots = (self.offsets_t + torch.where(filling, self.valid_t, ring)).long()  # (B, Hkv)
        at_slots = slots[..., None].expand(-1, -1, key.shape[-1])
        self.keys.scatter_(1, at_slots, key)
        self.values.scatter_(1, at_slots, value)
        self.positions.scatter_(1, slots, t.expand(slots.shape))
        if self.quest_heads:
            update_bounds(self.page_min, self.page_max, slots[:, self.quest_heads_t], key[:, self.quest_heads_t], self.page)
        self.valid_t.add_(filling.to(torch.int32))
        self.written_t.add_(1)

    def page_lists(self, query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(page_ids (B, Hkv, W) int32, page_counts (B, Hkv) int32, limits (B, Hkv) int32) for one decode step, from
        the device counts alone. W is fixed by the pool layout: with ``query`` (B, Hq, D), ``read_width`` (the widest
        non-Quest head's capacity in pages, or the Quest pick), without it every head's capacity (Quest heads then
        read all their pages). Each row's list for a head is ascending, its first ``count`` entries valid; counts and
        limits are the row's own."""
        batch = self.keys.shape[0]
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
        self._write(key, value)
        ids, counts, limits = self.page_lists(query)
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

    # ---- inspection and accounting -------------------------------------------------------------------
    def kept_positions(self, h: int) -> torch.Tensor:
        """Token indices head ``h`` holds now, in slot order (for tests and inspection): (B, the most any row holds),
        indices in the batch's sequence (a left-padded row's first real token is its pad count), -1 in the slots a
        row holds no token in."""
        return self.positions[:, self.offsets[h] : self.offsets[h] + self.valid[h]]

    def kv_bytes(self) -> int:
        """Bytes this layer holds on its device: pools (reserved slots included), page bounds and pending prompt."""
        tensors = [self.keys, self.values, self.page_min, self.page_max, *(self.pending or ())]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dense_kv_bytes(self) -> int:
        """What a full cache of the same tokens would hold."""
        ref = self.keys if self.keys is not None else (self.pending[0] if self.pending else None)
        if ref is None:
            return 0
        dim = ref.shape[-1]
        return 2 * ref.shape[0] * len(self.plans) * self.seen * dim * ref.element_size()
