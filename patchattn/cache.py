"""The head-budgeted KV cache: each KV head keeps what its recipe plan allows, in one pool per layer.

A transformers ``Cache`` whose layers hold, per layer, one key pool and one value pool of shape (B, C, D).
KV head ``h`` owns a page-aligned region ``[offset_h, offset_h + cap_h)`` of the pool, so a head's memory is
its own budget, not the longest head's: a ``window`` head (sinks + rolling window, StreamingLLM) holds
``sink + window`` slots for ever, a ``snapkv`` head the prompt tokens chosen after prefill plus what is
generated, a ``full`` head everything. Inside its region a head's valid slots are one run starting at the
offset, so the decode kernel reads every head from the same pool (a zero head stride) with per-head page
lists and per-head limits (:func:`patchattn.kernels.sparse_decode`). ``full``/``snapkv`` heads with
``decode_pages`` keep per-page key minima and maxima and read only the pages whose bound on q.k is largest
(Quest).

The cache never sees queries: the prompt's keys and values wait in ``pending`` until the patched attention
function, which has the queries, calls :meth:`BudgetLayer.finish_prefill`. Decode-time bookkeeping
(write slots, limits, page counts) stays on the device, so a decode step makes no host-device sync.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .hf import context_length, text_config
from .recipe import KVPlan

logger = logging.getLogger(__name__)

PAGE_TOKENS = 16  # cache page: the unit of the decode kernel's lists and of Quest's key bounds
GROWTH_TOKENS = 512  # the most headroom a growing head gets when its region is (re)allocated
SNAPKV_POOL = 5  # SnapKV's 1-D average-pool width over token votes (keeps neighbours of strong tokens together)


def snapkv_votes(q_obs: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """SnapKV's importance of each key before the observation window.

    ``q_obs`` (B, Hkv, G, obs, D): the prompt's last ``obs`` queries of each KV head's query group; ``key``
    (B, Hkv, N, D), the window being its last ``obs`` keys. Each observation query's softmax runs over every key
    it can see (the window causally), so a query that looks mostly at its neighbours casts little weight on the
    rest; the weights on the keys before the window are summed over queries and group, then average-pooled.
    Returns (B, Hkv, N - obs) float32.
    """
    obs, n = q_obs.shape[-2], key.shape[2]
    scores = torch.matmul(q_obs.float(), key[:, :, None].float().transpose(-1, -2)) * scale  # (B, Hkv, G, obs, N)
    future = torch.arange(n, device=key.device)[None, :] > torch.arange(n - obs, n, device=key.device)[:, None]
    attn = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)[..., : n - obs]
    votes = attn.sum((2, 3))
    flat = votes.reshape(-1, 1, votes.shape[-1])
    pooled = torch.nn.functional.avg_pool1d(flat, SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2, count_include_pad=False)
    return pooled.view_as(votes)


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, (n + multiple - 1) // multiple * multiple)


def _headroom(n_tokens: int, page: int) -> int:
    """Free slots a growing head gets on (re)allocation: a 32nd of what it holds, 4 pages to GROWTH_TOKENS (a head
    kept in full then holds at most ~3% more than the dense cache; growing by 512 tokens copies the pool once per
    512 generated tokens)."""
    return min(GROWTH_TOKENS, max(4 * page, n_tokens // 32))


class BudgetLayer(DynamicLayer):
    """One layer's pooled, head-budgeted cache (see the module docstring)."""

    is_croppable = False

    def __init__(self, plans: list[KVPlan], page_tokens: int = PAGE_TOKENS):
        super().__init__()
        self.plans = plans
        self.page = page_tokens
        self.seen = 0  # tokens this layer has been given (the logical sequence length)
        self.written = 0  # tokens written to the pools (seen, less those waiting in pending or incoming)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the prompt, until finish_prefill
        self.incoming: tuple[torch.Tensor, torch.Tensor] | None = None  # a step's new tokens, until attend
        self.valid = [0] * len(plans)  # host mirror: valid slots per head
        self.caps = [0] * len(plans)
        self.offsets = [0] * len(plans)
        self.quest_heads = [h for h, p in enumerate(plans) if p.decode_pages > 0]

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
        n_kv = len(self.plans)
        for i in range(query.shape[2]):
            self._append(key_states[:, :, i : i + 1], value_states[:, :, i : i + 1])
            q = query[:, :, i]
            ids, counts, limits = self.page_lists(q)
            k_view, v_view = self.pool_views(n_kv)
            decode = self._decode_function(q, k_view, v_view, backend)
            outs.append(decode(q, k_view, v_view, ids, counts, limits, self.page, scale=scale))
        return outs[0][:, None] if len(outs) == 1 else torch.stack(outs, dim=1)

    def _decode_function(self, q, k_view, v_view, backend: str):
        """The decode kernel for this layer's inputs, chosen (and checked) once per backend, dtype and device."""
        from .kernels import decode_function

        key = (backend, q.dtype, q.device, q.shape[1:], k_view.shape[1], k_view.shape[-1])
        if getattr(self, "_decode_key", None) != key:
            self._decode_key, self._decode = key, decode_function(q, k_view, v_view, self.page, backend)
        return self._decode

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.seen + n, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.plans, self.page)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.pending is not None:
            self.pending = tuple(t.index_select(0, beam_idx.to(t.device)) for t in self.pending)
        if self.keys is not None:
            for name in ("keys", "values", "positions", "page_min", "page_max"):
                t = getattr(self, name, None)
                if t is not None:
                    setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the head-budgeted cache cannot be cropped (evicted tokens are gone)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the head-budgeted cache does not support batch expansion")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the head-budgeted cache does not support batch selection")

    # ---- prefill: choose what each head keeps --------------------------------------------------------
    def _keep_indices(self, query: torch.Tensor | None, key: torch.Tensor, scale: float) -> list[torch.Tensor]:
        """Per head, the prompt token indices it keeps, ascending ((B, T) or (T,) long). SnapKV heads that share an
        observation window vote in one batch (one score matrix, softmax and pooling for all of them)."""
        n = key.shape[2]
        device = key.device
        keep: list[torch.Tensor | None] = [None] * len(self.plans)
        snap: dict[int, list[int]] = {}
        for h, plan in enumerate(self.plans):
            if plan.policy == "window":
                sink, window = plan.sink_tokens, plan.window_tokens
                full = n <= sink + window
                keep[h] = torch.arange(n, device=device) if full else torch.cat([torch.arange(sink, device=device), torch.arange(n - window, n, device=device)])
            elif plan.policy == "snapkv" and n > plan.budget_tokens:
                if query is None:  # no queries reached us: keep the most recent tokens
                    keep[h] = torch.arange(n - plan.budget_tokens, n, device=device)
                else:
                    snap.setdefault(plan.window_tokens, []).append(h)
            else:
                keep[h] = torch.arange(n, device=device)
        group = query.shape[1] // key.shape[1] if query is not None else 1
        for obs, heads in snap.items():
            heads_t = torch.tensor(heads, device=device)
            q_obs = query[:, :, -obs:].reshape(query.shape[0], key.shape[1], group, obs, -1)[:, heads_t]  # (B, h, G, obs, D)
            votes = snapkv_votes(q_obs, key[:, heads_t], scale)  # (B, h, n - obs)
            budgets = [self.plans[h].budget_tokens - obs for h in heads]
            top = votes.topk(max(budgets), dim=-1).indices  # best first: each head's own top-k is a prefix
            recent = torch.arange(n - obs, n, device=device).expand(top.shape[0], -1)
            for i, (h, budget) in enumerate(zip(heads, budgets)):
                keep[h] = torch.cat([top[:, i, :budget].sort(-1).values, recent], dim=-1)
        return keep

    def finish_prefill(self, query: torch.Tensor | None = None, scale: float | None = None) -> None:
        """Compress the pending prompt into the pool (``query`` (B, Hq, N, D) post-RoPE, for SnapKV)."""
        if self.pending is None:
            return
        key, value = self.pending
        self.pending = None
        batch, n_kv, n, dim = key.shape
        scale = scale if scale is not None else 1.0 / math.sqrt(dim)
        keep = self._keep_indices(query, key, scale)
        counts = [k.shape[-1] for k in keep]
        caps = []
        for h, plan in enumerate(self.plans):
            if plan.policy == "window":
                caps.append(_round_up(plan.sink_tokens + plan.window_tokens, self.page))
            else:
                caps.append(_round_up(counts[h] + _headroom(counts[h], self.page), self.page))
        self._allocate(caps, batch, dim, key.dtype, key.device)
        for h, idx in enumerate(keep):
            idx_b = idx.expand(batch, -1) if idx.dim() == 1 else idx
            gather = idx_b[..., None].expand(-1, -1, dim)
            k_h = torch.gather(key[:, h], 1, gather)
            v_h = torch.gather(value[:, h], 1, gather)
            slots = self._prompt_slots(h, n, counts[h])
            self.keys[:, slots] = k_h
            self.values[:, slots] = v_h
            self.positions[:, slots] = idx_b.to(torch.int32)
            self.valid[h] = counts[h]
        self.written = n
        self._sync_limits()
        if self.quest_heads:
            self._rebuild_bounds()

    def _prompt_slots(self, h: int, n: int, count: int) -> torch.Tensor:
        """Pool slots of head ``h``'s kept prompt tokens: in order, except a full window head, whose window
        tokens sit where the ring formula of :meth:`_append` puts them."""
        plan, base = self.plans[h], self.offsets[h]
        local = torch.arange(count, device=self.keys.device)
        if plan.policy == "window" and n > plan.sink_tokens + plan.window_tokens:
            sink, window = plan.sink_tokens, plan.window_tokens
            positions = torch.arange(n - window, n, device=self.keys.device)
            local[sink:] = sink + (positions - sink) % window
        return base + local

    # ---- storage -----------------------------------------------------------------------------------
    def _allocate(self, caps: list[int], batch: int, dim: int, dtype, device) -> None:
        """(Re)allocate the pools for ``caps``, copying what each head already holds."""
        offsets = [sum(caps[:h]) for h in range(len(caps))]
        total = sum(caps)
        keys = torch.zeros(batch, total, dim, dtype=dtype, device=device)  # zeros: unwritten slots stay finite
        values = torch.zeros_like(keys)
        positions = torch.full((batch, total), -1, dtype=torch.int32, device=device)
        if self.keys is not None:
            for h in range(len(caps)):
                n = self.valid[h] if self.plans[h].policy != "window" else self.caps[h]
                new, old = slice(offsets[h], offsets[h] + n), slice(self.offsets[h], self.offsets[h] + n)
                keys[:, new], values[:, new], positions[:, new] = self.keys[:, old], self.values[:, old], self.positions[:, old]
        self.keys, self.values, self.positions = keys, values, positions  # positions: each slot's token index
        self.caps, self.offsets = list(caps), offsets
        self.dtype, self.device = dtype, device
        page = self.page
        self.offsets_t = torch.tensor(offsets, device=device, dtype=torch.int32)
        width = max(c // page for c in caps)
        table = torch.zeros(len(caps), width, dtype=torch.int32)
        for h, (off, cap) in enumerate(zip(offsets, caps)):
            table[h, : cap // page] = torch.arange(off // page, (off + cap) // page, dtype=torch.int32)
        self.page_table = table.to(device)
        window = [p.policy == "window" for p in self.plans]
        self.has_window = any(window)
        shapes = {(p.sink_tokens, p.window_tokens) for p in self.plans if p.policy == "window"}
        self.ring_shape = shapes.pop() if len(shapes) == 1 else None  # one ring shape: its slot is a host integer
        self.is_window_t = torch.tensor(window, device=device)
        self.sink_t = torch.tensor([p.sink_tokens for p in self.plans], device=device)
        self.ring_t = torch.tensor([max(1, p.window_tokens) for p in self.plans], device=device)
        self._head_index: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # see _index
        if self.quest_heads:
            self.page_min = torch.empty(batch, total // page, dim, dtype=dtype, device=device)
            self.page_max = torch.empty_like(self.page_min)

    def _sync_limits(self) -> None:
        """Device copies of each head's limit (the end of its valid run in the pool) and of which heads still grow
        (after prefill, a reallocation, or a ring filling up: a host->device copy)."""
        self.limits_t = torch.tensor([o + v for o, v in zip(self.offsets, self.valid)], device=self.device, dtype=torch.int32)
        grows = [p.policy != "window" or self.valid[h] < self.caps_used(h) for h, p in enumerate(self.plans)]
        self.grows_t = torch.tensor(grows, device=self.device, dtype=torch.int32)
        self.counts_t = None  # page counts, recomputed when a head starts a new page

    def caps_used(self, h: int) -> int:
        """Slots a window head holds when full (sinks + window); a growing head's capacity."""
        plan = self.plans[h]
        return plan.sink_tokens + plan.window_tokens if plan.policy == "window" else self.caps[h]

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n_new = key_states.shape[-2]
        if self.pending is not None:
            self.finish_prefill()
        if any(p.policy != "window" and self.valid[h] + n_new > self.caps[h] for h, p in enumerate(self.plans)):
            caps = [
                self.caps[h] if p.policy == "window" else max(self.caps[h], _round_up(self.valid[h] + n_new + _headroom(self.valid[h], self.page), self.page))
                for h, p in enumerate(self.plans)
            ]
            logger.debug("growing cache pool to %d slots", sum(caps))
            self._allocate(caps, self.keys.shape[0], self.keys.shape[-1], self.keys.dtype, self.keys.device)
            self._sync_limits()
            if self.quest_heads:
                self._rebuild_bounds()
        for i in range(n_new):
            self._append_one(key_states[:, :, i], value_states[:, :, i])

    def _append_one(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write token ``self.written`` (key/value (B, Hkv, D)) into every head's region: a growing head at its
        limit, a window head at its ring slot. Device-side slots; no host-device sync."""
        t = self.written
        if not self.has_window:
            slots = self.limits_t
        elif self.ring_shape is not None:
            sink, window = self.ring_shape
            ring = t if t < sink + window else sink + (t - sink) % window
            slots = torch.where(self.is_window_t, self.offsets_t + ring, self.limits_t)
        else:  # window heads of different shapes: every head's ring slot on the device
            ring_t = torch.where(t < self.sink_t + self.ring_t, t, self.sink_t + (t - self.sink_t).remainder(self.ring_t))
            slots = torch.where(self.is_window_t, self.offsets_t + ring_t, self.limits_t)
        slots = slots.long()
        self.keys[:, slots] = key
        self.values[:, slots] = value
        self.positions[:, slots] = t
        if self.quest_heads:
            self._update_bounds(slots, key)
        self.limits_t += self.grows_t
        crossed = False
        for h, plan in enumerate(self.plans):
            if plan.policy != "window" or self.valid[h] < self.caps_used(h):
                self.valid[h] += 1
                if self.valid[h] % self.page == 1:
                    self.counts_t = None
                crossed |= plan.policy == "window" and self.valid[h] == self.caps_used(h)
        if crossed:  # a window head just filled its ring: it stops growing
            self._sync_limits()
        self.written += 1

    # ---- Quest page bounds ---------------------------------------------------------------------------
    def _rebuild_bounds(self) -> None:
        """Per-page key minima and maxima of every Quest head's valid pages (after prefill or reallocation)."""
        page = self.page
        for h in self.quest_heads:
            n = self.valid[h]
            n_pages = -(-n // page)
            region = self.keys[:, self.offsets[h] : self.offsets[h] + n_pages * page]  # min/max: exact in any dtype
            region = region.view(region.shape[0], n_pages, page, -1)
            filled = (torch.arange(n_pages * page, device=region.device) < n).view(1, n_pages, page, 1)
            first = self.offsets[h] // page
            self.page_min[:, first : first + n_pages] = region.masked_fill(~filled, float("inf")).amin(2)
            self.page_max[:, first : first + n_pages] = region.masked_fill(~filled, float("-inf")).amax(2)

    def _update_bounds(self, slots: torch.Tensor, key: torch.Tensor) -> None:
        heads, _ = self._index(tuple(self.quest_heads))
        qslots = slots[heads]
        pages = qslots // self.page
        first = (qslots % self.page == 0)[None, :, None]
        k = key[:, heads]
        self.page_min[:, pages] = torch.where(first, k, torch.minimum(self.page_min[:, pages], k))
        self.page_max[:, pages] = torch.where(first, k, torch.maximum(self.page_max[:, pages], k))

    def _index(self, heads: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Device tensors of ``heads`` and of their regions' first pages, made once per pool layout (decode steps
        then copy nothing from the host)."""
        hit = self._head_index.get(heads)
        if hit is None:
            firsts = [self.offsets[h] // self.page for h in heads]
            hit = self._head_index[heads] = (
                torch.tensor(heads, device=self.device),
                torch.tensor(firsts, device=self.device, dtype=torch.int32),
            )
        return hit

    def _quest_pages(self, query: torch.Tensor) -> dict[tuple[int, ...], torch.Tensor]:
        """The pages to read for Quest heads with more valid pages than their budget, batched over heads that
        share a page count and a budget: {heads: (B, len(heads), decode_pages) int32 pool pages}."""
        page = self.page
        group = query.shape[1] // len(self.plans)
        batches: dict[tuple[int, int], list[int]] = {}
        for h in self.quest_heads:
            n_pages = -(-self.valid[h] // page)
            if n_pages > self.plans[h].decode_pages:
                batches.setdefault((n_pages, self.plans[h].decode_pages), []).append(h)
        picks = {}
        for (n_pages, budget), heads in batches.items():
            heads_t, firsts = self._index(tuple(heads))
            index = (firsts[:, None] + torch.arange(n_pages, device=query.device, dtype=torch.int32)).long()  # (h, P)
            kmin = self.page_min[:, index].float()  # (B, h, P, D)
            kmax = self.page_max[:, index].float()
            q = query.view(query.shape[0], len(self.plans), group, -1)[:, heads_t].float()  # (B, h, G, D)
            q = q[:, :, :, None]  # (B, h, G, 1, D)
            bound = torch.maximum(q * kmin[:, :, None], q * kmax[:, :, None]).sum(-1).amax(2)  # (B, h, P)
            bound[..., 0] = float("inf")  # the attention sink
            bound[..., n_pages - 1] = float("inf")  # the newest tokens
            picks[tuple(heads)] = bound.topk(budget, dim=-1).indices.to(torch.int32) + firsts[:, None]
        return picks

    # ---- decode attention ----------------------------------------------------------------------------
    def page_lists(self, query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(page_ids (B, Hkv, W) int32, page_counts (B, Hkv) int32, limits (B, Hkv) int32) for one decode step."""
        batch = self.keys.shape[0]
        page = self.page
        widths = [-(-self.valid[h] // page) for h in range(len(self.plans))]
        picks = self._quest_pages(query) if (self.quest_heads and query is not None) else {}
        for heads, chosen in picks.items():
            for h in heads:
                widths[h] = chosen.shape[-1]
        width = max(widths)
        if self.counts_t is None:
            self.counts_t = (self.limits_t - self.offsets_t + (page - 1)) // page
        counts = self.counts_t
        limits = self.limits_t.expand(batch, -1)
        ids = self.page_table[:, :width].expand(batch, -1, -1)
        if picks:
            ids = ids.clone()
            counts = counts.clone()
            for heads, chosen in picks.items():
                heads_t, _ = self._index(heads)
                ids[:, heads_t, : chosen.shape[-1]] = chosen
                counts[heads_t] = chosen.shape[-1]
        return ids, counts.expand(batch, -1), limits

    def pool_views(self, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pools as (B, Hkv, C, D) views with a zero head stride (what the decode kernel reads)."""
        batch, total, dim = self.keys.shape
        return self.keys[:, None].expand(batch, n_kv_heads, total, dim), self.values[:, None].expand(batch, n_kv_heads, total, dim)

    def kept_positions(self, h: int) -> torch.Tensor:
        """Token indices head ``h`` holds now (B, valid), in slot order (for tests and inspection)."""
        return self.positions[:, self.offsets[h] : self.offsets[h] + self.valid[h]]

    # ---- accounting ----------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes this layer holds on its device: pools, page bounds and pending prompt."""
        tensors = [self.keys, self.values, getattr(self, "page_min", None), getattr(self, "page_max", None)]
        tensors += list(self.pending or ())
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dense_kv_bytes(self) -> int:
        """What a full cache of the same tokens would hold."""
        ref = self.keys if self.keys is not None else (self.pending[0] if self.pending else None)
        if ref is None:
            return 0
        dim = ref.shape[-1]
        return 2 * ref.shape[0] * len(self.plans) * self.seen * dim * ref.element_size()


def sliding_windows(config) -> list[int | None]:
    """Per layer, the model's own sliding attention window (None for full-attention layers)."""
    text = text_config(config)
    n_layers = text.num_hidden_layers
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return [None] * n_layers
    types = getattr(text, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n_layers


def respect_sliding_window(plans: list[KVPlan], window: int | None) -> list[KVPlan]:
    """A layer whose model attends only the last ``window`` tokens needs no more: its heads keep that window
    (or their own smaller sink + window)."""
    if window is None:
        return plans
    return [
        p if p.policy == "window" and p.sink_tokens + p.window_tokens <= window else KVPlan("window", window_tokens=window)
        for p in plans
    ]


def cap_to_context(plans: list[KVPlan], context: int | None) -> list[KVPlan]:
    """A window longer than the model's context keeps, at most, the context: a window head's ring is allocated whole
    when the prefill ends, so a recipe's window of 10^8 tokens would otherwise take its memory for nothing."""
    if not context:
        return plans
    return [
        KVPlan("window", sink_tokens=min(p.sink_tokens, context - 1), window_tokens=context - min(p.sink_tokens, context - 1))
        if p.policy == "window" and p.sink_tokens + p.window_tokens > context else p
        for p in plans
    ]


class HeadBudgetCache(Cache):
    """A transformers ``Cache`` of :class:`BudgetLayer` s, one per layer, from a recipe's KV plans."""

    def __init__(self, kv_plans: list[list[KVPlan]], page_tokens: int = PAGE_TOKENS):
        super().__init__(layers=[BudgetLayer(plans, page_tokens) for plans in kv_plans])

    @classmethod
    def from_recipe(cls, recipe, config=None, page_tokens: int = PAGE_TOKENS) -> "HeadBudgetCache":
        """The recipe's KV plans, capped by the model's own sliding windows and its context when ``config`` is given."""
        plans = recipe.kv_plans()
        if config is not None:
            context = context_length(config)
            plans = [cap_to_context(respect_sliding_window(p, w), context) for p, w in zip(plans, sliding_windows(config))]
        return cls(plans, page_tokens)

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)

    def dense_kv_bytes(self) -> int:
        return sum(layer.dense_kv_bytes() for layer in self.layers)
