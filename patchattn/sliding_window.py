"""The model's own sliding window (Gemma, Mistral), applied by patchattn rather than by a mask.

For an unpadded prefill under a layer's sliding window, the mask builder registered for patchattn
(:func:`mask_for_patchattn`) gives no mask, and the attention function applies the window itself
(:func:`model_window` names it): the kernels then compute only the blocks the window reaches, where SDPA with a mask
computes them all. Every other call (padding, decode steps, chunked attention) gets transformers' own mask.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import hf, stats
from .chunked import skip_chunk_mask
from .kernels import finalize_ragged, sparse_prefill_triton, triton_prefill_unsupported
from .layout import num_blocks, window_blocks


# From this many tokens a dense prefill of a model with its own sliding windows runs patchattn's windowed kernel, which
# computes only the blocks the window reaches; a shorter one, dense in every layer, runs the model's own attention
# (patchattn.dense_forward). Measured on Gemma 3 270M (window 512, 15 of 18 layers; H100, 2026-12-07, forwards
# alternated): the model's own path was 1.13x / 1.10x faster at 2K / 4K (the kernel's launches cost ~120 µs of host
# time a layer, and a small model is launch-bound there), the windowed kernel 1.76x faster at 8K (SDPA computes the
# whole square under a mask). The model's own path is dense's, so below this a patched model cannot lose to dense.
WINDOW_KERNEL_MIN_TOKENS = 8192


def plain_sliding_prefill(kwargs) -> bool:
    """Whether transformers asks for the mask of an unpadded prefill under the model's own sliding window, and nothing
    else (no chunked attention, packed sequences or extra mask functions: those turn ``allow_is_causal_skip`` off)."""
    config = kwargs.get("config")
    window = kwargs.get("local_size")
    if not window or not kwargs.get("allow_is_causal_skip", True) or config is None or "q_length" not in kwargs:
        return False
    if hf.sliding_window(config) != window or hf.chunked_attention(config):
        return False
    if kwargs["q_length"] != kwargs.get("kv_length") or kwargs.get("q_offset", 0) or kwargs.get("kv_offset", 0):
        return False
    padding = kwargs.get("attention_mask")
    return padding is None or bool(padding.all())


def mask_for_patchattn(*args, **kwargs):
    """transformers' SDPA mask builder, except for a plain sliding-window prefill (no mask: the attention function
    applies the window itself, ``sliding_window``, so the kernels compute only the blocks the window reaches) and an
    unpadded chunk of a prompt (no mask: causal by position, :mod:`patchattn.chunked`)."""
    from transformers.masking_utils import sdpa_mask

    if not args and (plain_sliding_prefill(kwargs) or skip_chunk_mask(kwargs)):
        return None
    return sdpa_mask(*args, **kwargs)


def model_window(attention_mask, n_q: int, n_k: int, kwargs) -> int:
    """The model's sliding window this call must apply itself (0: none): :func:`mask_for_patchattn` left a plain
    sliding-window prefill's mask out, and the layer names its window."""
    window = hf.call_sliding_window(kwargs)
    return window if attention_mask is None and window and n_q == n_k and n_k > window else 0


def window_band_blocks(n_blk: int, window_rows: int) -> int:
    """Causal blocks a sliding window reaches in an n_blk-row layout (row i: min(i + 1, window_rows))."""
    full = min(n_blk, window_rows)
    return full * (full + 1) // 2 + (n_blk - full) * window_rows


_WINDOW_LAYOUTS: "OrderedDict[tuple, tuple]" = OrderedDict()


def _window_layout(batch: int, heads: int, n_blk: int, rows: int, device) -> tuple:
    """The finished layout of a sliding window alone (counts, ids, density), kept for the next call of that shape:
    it depends on nothing else, and building it reads a count back from the GPU."""
    key = (batch, heads, n_blk, rows, str(device))
    hit = _WINDOW_LAYOUTS.get(key)
    if hit is None:
        every = torch.ones(1, 1, n_blk, n_blk, dtype=torch.bool, device=device).expand(batch, heads, -1, -1)
        hit = _WINDOW_LAYOUTS[key] = finalize_ragged(every, window_rows=rows)
        while len(_WINDOW_LAYOUTS) > 8:
            _WINDOW_LAYOUTS.popitem(last=False)
    return hit


def windowed_dense(module, query, key, value, scaling, dropout, window, layer_idx, block_size, backend, kwargs):
    """Dense attention under the model's sliding window (no mask given): the Triton kernel over the window's blocks
    where it runs (what the window saves, unlike SDPA with a mask; the Hopper kernel takes no window), else SDPA with
    the window as a mask (always with backend "torch")."""
    n = query.shape[2]
    rows = window_blocks(window, block_size)
    use_kernel = backend != "torch" and dropout == 0.0 and kwargs.get("softcap") is None
    use_kernel = use_kernel and triton_prefill_unsupported(query, key, value, block_size) is None
    if stats.is_recording():
        band = window_band_blocks(num_blocks(n, block_size), rows) * query.shape[0] * query.shape[1]
        stats.report(layer_idx, band, band, kernel="triton" if use_kernel else "sdpa")
    if use_kernel:
        counts, ids, density = _window_layout(query.shape[0], query.shape[1], num_blocks(n, block_size), rows, query.device)
        out = sparse_prefill_triton(query, key, value, counts, ids, block_size, scale=scaling, density=density, window=window)
        return out.transpose(1, 2).contiguous()
    pos = torch.arange(n, device=query.device)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    return sdpa_attention_forward(module, query, key, value, mask[None, None], dropout=dropout, scaling=scaling, **kwargs)[0]
