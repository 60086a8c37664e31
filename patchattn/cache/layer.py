"""One layer of the head-budgeted KV cache: where each head's tokens go, what it keeps, and transformers' layer contract.

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

The pools, sized when the prefill ends, and the device's half of a decode step over them are :mod:`.pools`.
"""

from __future__ import annotations

import itertools
import math

import torch
from transformers.cache_utils import DynamicLayer

from ..recipe import KVPlan
from .plans import kept_prompt_tokens
from .pools import HeadPools, headroom_tokens

PAGE_TOKENS = 16  # cache page: the unit of the decode kernel's lists and of Quest's key bounds


def _runs_of_equal_padding(pads: list[int]) -> list[tuple[int, slice]]:
    """(pad, rows) of each run of neighbouring rows with the same left padding: slices, so that a run's prompt is a
    view (an unpadded batch is one run of every row)."""
    runs, start = [], 0
    for pad, rows in itertools.groupby(pads):
        stop = start + len(list(rows))
        runs.append((pad, slice(start, stop)))
        start = stop
    return runs


class BudgetLayer(HeadPools, DynamicLayer):
    """One layer's pooled, head-budgeted cache (see the module docstring). ``reserve_tokens``: decode tokens every
    growing head has room for when the prefill ends (None: a little headroom, see :func:`.pools.headroom_tokens`)."""

    is_croppable = False
    # generate's compile path takes it: its decode steps are fixed kernels over fixed buffers, which a patched model
    # replays as a CUDA graph (patchattn.decode_graphs) instead of handing the forward to torch.compile
    is_compileable = True

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
        self.prompt_tokens: int | None = None  # the whole prompt, when it arrives in chunks (expect_prompt)
        self.query_tail: torch.Tensor | None = None  # the chunks' last queries, for the SnapKV votes at the end
        self.tail_tokens = max((p.window_tokens for p in plans if p.policy == "snapkv"), default=0)
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

    def room_for(self, n_tokens: int) -> bool:
        """Whether ``n_tokens`` more decode tokens fit the pools as they are (no reallocation)."""
        return self.keys is not None and n_tokens <= self.room_tokens

    def advance_host(self, n_tokens: int) -> None:
        """The host's share of ``n_tokens`` decode tokens whose device share a replayed graph does (count them, take
        them off the room): what :meth:`update` and :meth:`attend` do in Python around the kernels."""
        if not self.room_for(n_tokens):
            raise RuntimeError(f"no room for {n_tokens} more tokens without reallocating: run the step eagerly")
        self.seen += n_tokens
        self.room_tokens -= n_tokens

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        """The prompt's mask is the prefill's; after it no mask is read (each head attends what it keeps, each row
        past its own padding), so later calls get the smallest one, of a size that does not move from step to step."""
        n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return (self.seen + n, 0) if self.keys is None else (1, 0)

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

    def expect_prompt(self, n_tokens: int) -> None:
        """Before the prefill: the prompt comes in chunks (``generate``'s ``prefill_chunk_size``) and is ``n_tokens``
        long. Each chunk's keys wait with the others' until the last chunk has been attended; only then does each
        head choose what it keeps (:meth:`prefill_attended`), over the whole prompt, as unchunked."""
        self.prompt_tokens = n_tokens

    def prefill_attended(self, query: torch.Tensor, scale: float | None = None) -> None:
        """A prefill call's queries (B, Hq, n, D) have attended the pending prompt: compress it now
        (:meth:`finish_prefill`), unless more chunks of it are to come; their last queries are kept for SnapKV."""
        if self.prompt_tokens is not None and self.seen < self.prompt_tokens:
            if self.tail_tokens:
                tail = query[:, :, -self.tail_tokens:]
                both = tail if self.query_tail is None else torch.cat([self.query_tail, tail], dim=2)
                self.query_tail = both[:, :, -self.tail_tokens:]
            return
        if self.query_tail is not None and query.shape[2] < self.tail_tokens:  # a last chunk shorter than the window
            query = torch.cat([self.query_tail, query], dim=2)[:, :, -self.tail_tokens:]
        self.query_tail = None
        self.finish_prefill(query, scale)

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
            # the prompt's queries past the row's padding; a chunked prompt's last ones only (the padding is long before)
            q = None if query is None else query[rows, :, pad:] if query.shape[2] == n else query[rows]
            keeps.append(kept_prompt_tokens(self.policies, q, key[rows, :, pad:], scale))
            counts[rows] = [[k.shape[-1] for k in keeps[-1]]] * (rows.stop - rows.start)
        most = [max(row[h] for row in counts) for h in range(n_kv)]
        extra = [self.reserve_tokens if self.reserve_tokens is not None else headroom_tokens(c, self.page) for c in most]
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

    def _prompt_slots(self, h: int, n: int, count: int) -> torch.Tensor:
        """Pool slots of head ``h``'s kept prompt tokens: in order, except a full window head, whose window
        tokens sit where the ring formula of :meth:`_write` puts them."""
        return self.offsets[h] + self.policies[h].prompt_slots(n, count, self.keys.device)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write tokens that no query attends (key/value (B, Hkv, n, D)), finishing a prefill nobody finished."""
        if self.pending is not None:
            self.finish_prefill()
        self._make_room(key_states.shape[-2])
        for i in range(key_states.shape[-2]):
            self._write(key_states[:, :, i], value_states[:, :, i])

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
