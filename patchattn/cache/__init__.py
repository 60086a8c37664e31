"""The head-budgeted KV cache: each KV head keeps what its recipe plan allows, in one pool per layer.

:class:`HeadBudgetCache` is a transformers ``Cache`` of :class:`~.layer.BudgetLayer` s. The cache never sees
queries: the prompt's keys and values wait until the patched attention function, which has the queries, calls
:meth:`BudgetLayer.finish_prefill`; each head then keeps what its plan's :mod:`KV policy <patchattn.kv_policies>`
chooses (:mod:`.plans`) among each row's real tokens (a left-padded batch says its padding first), in its own region
of the layer's pools, sized once with room for the decode tokens to come. A decode step is a fixed sequence of tensor
ops over those pools, with per-row and per-head counts and page lists on the device (:mod:`.pools`); Quest heads read
their best pages (:mod:`.quest`).
"""

from __future__ import annotations

from transformers.cache_utils import Cache

from ..hf import context_length
from ..kv_policies import SNAPKV_POOL, snapkv_votes
from .layer import PAGE_TOKENS, BudgetLayer
from .plans import cap_to_context, kept_prompt_tokens, respect_sliding_window, sliding_windows
from .pools import GROWTH_TOKENS


class HeadBudgetCache(Cache):
    """A transformers ``Cache`` of :class:`BudgetLayer` s, one per layer, from a recipe's KV plans. ``reserve_tokens``:
    decode tokens every growing head has room for when the prefill ends (``generate``'s ``max_new_tokens``: no
    reallocation, so fixed buffers, for the whole generation); None leaves a little headroom and grows on demand."""

    def __init__(self, kv_plans, page_tokens: int = PAGE_TOKENS, reserve_tokens: int | None = None):
        super().__init__(layers=[BudgetLayer(plans, page_tokens, reserve_tokens) for plans in kv_plans])

    @classmethod
    def from_recipe(cls, recipe, config=None, page_tokens: int = PAGE_TOKENS, reserve_tokens: int | None = None) -> "HeadBudgetCache":
        """The recipe's KV plans, capped by the model's own sliding windows and its context when ``config`` is given."""
        plans = recipe.kv_plans()
        if config is not None:
            context = context_length(config)
            plans = [cap_to_context(respect_sliding_window(p, w), context) for p, w in zip(plans, sliding_windows(config))]
        return cls(plans, page_tokens, reserve_tokens)

    def set_left_padding(self, pad_tokens: list[int] | None) -> None:
        """Each row's pad tokens on the left of the prompt, before the prefill (see
        :meth:`BudgetLayer.set_left_padding`); :mod:`patchattn.cache_hooks` reads them off the forward's mask."""
        for layer in self.layers:
            layer.set_left_padding(pad_tokens)

    def expect_prompt(self, n_tokens: int) -> None:
        """The prompt arrives in chunks and is ``n_tokens`` long (see :meth:`BudgetLayer.expect_prompt`)."""
        for layer in self.layers:
            layer.expect_prompt(n_tokens)

    def reserve(self, n_tokens: int) -> None:
        """Room for ``n_tokens`` more decode tokens in every layer (see :meth:`BudgetLayer.reserve`)."""
        for layer in self.layers:
            layer.reserve(n_tokens)

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)

    def dense_kv_bytes(self) -> int:
        return sum(layer.dense_kv_bytes() for layer in self.layers)


__all__ = [
    "GROWTH_TOKENS", "PAGE_TOKENS", "SNAPKV_POOL", "BudgetLayer", "HeadBudgetCache", "cap_to_context", "kept_prompt_tokens",
    "respect_sliding_window", "sliding_windows", "snapkv_votes",
]
