"""A prefill the recipe makes dense in every layer runs the model's own attention, not patchattn's function.

Below a recipe's break-even (or its ``min_sparse_tokens``) every layer makes the same SDPA call dense would, but
through patchattn's attention function: per layer a few dictionary and config reads before it gets there, 0.3-0.7 ms
per forward on the 1B and 8B shapes. Where the GPU's work outlasts the launching, that is hidden; a 135M model at 2-8K
tokens is launch-bound (SmolLM2's time to first token is ~30 ms at every length on an H100), and there it shows. So
such a forward runs with the attention implementation the patch replaced (and its mask builder): the very code path
of the dense model. The model's forward hook (:mod:`patchattn.cache_hooks`) asks :func:`dense_prefill` before the
forward and restores the patch after it.

Left on patchattn's path: a forward with a head-budgeted cache (its prefill fills the budgeted cache), a prefill chunk,
a forward over a filled cache, a prompt of :data:`~patchattn.sliding_window.WINDOW_KERNEL_MIN_TOKENS` or more to a model
with its own sliding windows (patchattn's windowed dense kernel computes only the blocks the window reaches),
calibration's capture, and, for the break-even, ``backend="sparse"`` (quality runs read the layouts at any length).
"""

from __future__ import annotations

import torch

from . import sliding_window, stats
from .compiled import compiled_for
from .config_keys import BACKEND_KEY, ORIGINAL_KEY
from .hf import given_cache, sliding_windows, text_config
from .layout import num_blocks, window_blocks


def _prompt(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The forward's input ids (keyword or first positional), else its input embeddings (None: neither)."""
    for value in (kwargs.get("input_ids"), args[0] if args else None, kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value
    return None


def dense_prefill(model, args: tuple, kwargs: dict) -> str | None:
    """The attention implementation to run this forward with instead of patchattn's (the one the patch replaced), when
    the recipe makes every layer of this prefill dense and nothing else needs patchattn's function; else None. The
    rules are :func:`patchattn.prefill.prefill_attention`'s: under ``min_sparse_tokens`` whatever the backend, under
    every layer's break-even unless the backend is ``"sparse"``; each said once, as there, and reported to an active
    sparsity record as each layer's call would have."""
    from .patch import _CAPTURE_HOOKS, DEFAULT_BACKEND
    from .prefill import _say_break_even, _say_dense_below

    config = model.config
    compiled = compiled_for(config)
    prompt = _prompt(args, kwargs)
    if compiled is None or _CAPTURE_HOOKS or prompt is None or prompt.shape[1] <= compiled.block_size:
        return None
    n_tokens = prompt.shape[1]
    cache = given_cache(kwargs)[1]
    if cache is not None and cache.get_seq_length() > 0:  # a chunk or a step over a filled cache
        return None
    windows = sliding_windows(config)
    if n_tokens >= sliding_window.WINDOW_KERNEL_MIN_TOKENS and any(w is not None for w in windows):
        return None  # the windowed kernel computes only the blocks the model's window reaches: faster than its own
    if n_tokens < compiled.recipe.min_sparse_tokens:
        _say_dense_below(compiled, n_tokens)
    elif (getattr(config, BACKEND_KEY, None) or DEFAULT_BACKEND) == "sparse" or any(
            not layer.all_dense and n_tokens >= layer.min_tokens for layer in compiled.layers):
        return None
    else:
        _say_break_even(compiled, n_tokens)
    if stats.is_recording():  # a dense prefill of every causal block per layer (under a model's window, those it reaches)
        n_blk = num_blocks(n_tokens, compiled.block_size)
        heads = prompt.shape[0] * text_config(config).num_attention_heads
        for layer_idx, window in enumerate(windows[: len(compiled.layers)]):
            rows = window_blocks(window, compiled.block_size) if window and n_tokens > window else n_blk
            reach = sliding_window.window_band_blocks(n_blk, rows) * heads
            stats.report(layer_idx, reach, reach, kernel="sdpa")
    return getattr(config, ORIGINAL_KEY, None) or "sdpa"
