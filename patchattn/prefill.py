"""The prefill path of the patched attention function: each layer's layout from its recipe plan, run by the kernels.

A prefill call (as many queries as keys, longer than a block) runs the layer's head groups' layouts through the sparse
kernels; where the recipe or the call asks for dense attention (a dense layer, a prompt under ``min_sparse_tokens``,
dropout, softcapping, backend "auto" where no kernel takes the input) it runs transformers' SDPA, or the model's
sliding window by itself (:mod:`patchattn.sliding_window`). Short prompts may replay as CUDA graphs
(:mod:`patchattn.graphs`); a chunk of a prompt prefilled in chunks runs :mod:`patchattn.chunked`.
"""

from __future__ import annotations

import logging

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import graphs, stats
from .chunked import chunk_attention, is_chunk
from .backends import kernel_backend
from .compiled import CompiledRecipe, HeadGroup, LayerPlan, compiled_for
from .config_keys import GRAPHS_KEY
from .kernels import finalize_ragged, prefill_kernel, sparse_prefill, triton_prefill_unsupported
from .layout import column_reads, column_tiles, finalize, num_blocks, window_blocks
from .sliding_window import model_window, window_band_blocks, windowed_dense

logger = logging.getLogger(__name__)


def _bool_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def layer_layout(
    plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, block_size: int, finished: bool = True, columns: bool = False
):
    """The (B, Hq, nqb, nkb) layout of one layer: per strategy class, one estimate over its heads and one vectorized
    layout of their per-head budgets. ``finished=False`` leaves out :func:`~patchattn.layout.finalize` (the prefill
    path fuses it into the compaction to counts and ids). ``columns=True`` returns ``(keep, columns)``: the token
    columns of the heads that read single keys besides their blocks, (B, Hq, C) ascending and padded with N (heads
    without any: all padding), or None when no head of the layer has any."""
    batch, n_q_heads, n_q, _ = query.shape
    n_tokens = key.shape[2]  # the keys' count: a chunk of a prompt prefilled in chunks has fewer queries
    group_size = n_q_heads // key.shape[1]
    cols = None
    if len(plan.groups) == 1 and plan.groups[0].all_heads:
        keep, cols = _group_layout(plan.groups[0], query, key, block_size, group_size)
    else:
        keep = torch.empty(batch, n_q_heads, num_blocks(n_q, block_size), num_blocks(n_tokens, block_size), dtype=torch.bool,
                           device=query.device)
        parts = []
        for group in plan.groups:
            heads = group.head_ids_on(query.device)
            keep[:, heads], group_cols = _group_layout(group, query, key, block_size, group_size)
            if group_cols is not None:
                parts.append((heads, group_cols))
        if parts:
            widest = max(c.shape[-1] for _, c in parts)
            cols = torch.full((batch, n_q_heads, widest), n_tokens, dtype=torch.int32, device=query.device)
            for heads, group_cols in parts:
                cols[:, heads, : group_cols.shape[-1]] = group_cols
    keep = finalize(keep, plan.dense_rows) if finished else keep
    return (keep, cols) if columns else keep


def _group_layout(group: HeadGroup, query: torch.Tensor, key: torch.Tensor, block_size: int, group_size: int):
    """One estimate over the group's heads (their keys indexed per head, GQA), then their per-head budgets' layout
    and token columns (None for block-only strategies)."""
    if not group.all_heads:
        head_ids = group.head_ids_on(query.device)
        query, key = query[:, head_ids], key[:, head_ids // group_size]
    est = group.strategies[0].estimate(query, key, block_size)
    return group.kind.layout_heads(est, group.strategies), group.kind.columns_heads(est, group.strategies)


def _say_dense_below(compiled: CompiledRecipe, n_tokens: int) -> None:
    """Once per patch: a prompt shorter than the recipe's ``min_sparse_tokens`` prefills densely."""
    if compiled.said_dense_below:
        return
    compiled.said_dense_below = True
    recipe = compiled.recipe
    verified = recipe.verified_lengths()
    why = (f"the shortest length its quality was verified within the bound at (verified: {', '.join(map(str, verified))})"
           if verified else "set where sparsity does not pay")
    logger.warning("patchattn: a %d-token prompt is shorter than recipe %s's min_sparse_tokens (%d, %s): prefilling it "
                   "densely; patch with a recipe whose min_sparse_tokens is lower to run it sparse", n_tokens,
                   recipe.name or "(unnamed)", recipe.min_sparse_tokens, why)


def _say_break_even(compiled: CompiledRecipe, n_tokens: int) -> None:
    """Once per patch and prompt length: the layers that prefill densely because the prompt is under their break-even
    on this device (:mod:`patchattn.calibrate.breakeven`)."""
    if n_tokens in compiled.said_break_even or len(compiled.said_break_even) > 64:
        return
    compiled.said_break_even.add(n_tokens)
    dense = [i for i, layer in enumerate(compiled.layers) if not layer.all_dense and n_tokens < layer.min_tokens]
    logger.info("patchattn: a %d-token prompt is under the prefill break-even of %d layer(s) (%s): they prefill densely, "
                "where sparsity would cost more than it saves on the device the recipe was calibrated on", n_tokens,
                len(dense), ", ".join(map(str, dense[:12])) + (" ..." if len(dense) > 12 else ""))


def _say_no_kernel(compiled: CompiledRecipe, reason: str) -> None:
    """Once per patch: the sparse kernels cannot take this prefill, so it runs dense (backend "auto")."""
    if compiled.said_no_kernel:
        return
    compiled.said_no_kernel = True
    logger.warning("patchattn: the sparse prefill kernels cannot run here (%s), and the PyTorch reference is slower than "
                   "dense attention: prefilling densely, so recipe %s saves no time on this device; backend='sparse' "
                   "runs its layouts anyway (to measure its quality)", reason, compiled.recipe.name or "(unnamed)")


def prefill_attention(module, query, key, value, attention_mask, scaling, dropout, layer_idx, backend, **kwargs):
    """Attention of a call the budgeted cache does not answer, as (B, Nq, Hq, D): the layer's sparse layouts where the
    recipe and the call allow them, dense attention (the model's window applied by size where it has one) elsewhere.
    ``backend``: the patch's (:mod:`patchattn.backends`)."""
    n_q, n_k = query.shape[2], key.shape[2]
    if n_q != n_k:  # a chunk of a prompt prefilled in chunks, or a step or prefill over a cache (dense)
        if is_chunk(n_q, n_k, attention_mask):  # a chunk whose mask the builder left out: causal by position
            return chunk_attention(compiled_for(module.config), query, key, value, scaling, dropout, layer_idx, backend, kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]
    compiled = compiled_for(module.config)
    window = model_window(attention_mask, n_q, n_k, kwargs)
    prefill = compiled is not None and n_q == n_k and n_q > compiled.block_size
    sparse_ok = prefill and dropout == 0.0 and kwargs.get("softcap") is None and not kwargs.get("output_attentions")
    if sparse_ok and n_q < compiled.recipe.min_sparse_tokens:
        _say_dense_below(compiled, n_q)
        sparse_ok = False
    elif sparse_ok and backend != "sparse" and n_q < compiled.layers[layer_idx].min_tokens:  # "sparse": quality runs
        _say_break_even(compiled, n_q)
        sparse_ok = False
    plan = compiled.layers[layer_idx] if sparse_ok else None
    mask = None  # what the sparse kernels are given: the model's mask as booleans (a window is applied by size)
    if plan is not None and not plan.all_dense:
        mask = None if window else _bool_mask(attention_mask)
        no_kernel = triton_prefill_unsupported(query, key, value, compiled.block_size, mask) if backend == "auto" else None
        if no_kernel is not None:  # the reference would lose to dense attention: dense, said once
            _say_no_kernel(compiled, no_kernel)
            plan = None
    if plan is None or plan.all_dense:
        if window:
            block_size = compiled.block_size if compiled is not None else 64
            return windowed_dense(module, query, key, value, scaling, dropout, window, layer_idx, block_size, backend, kwargs)
        if prefill and stats.is_recording():
            n_blk = num_blocks(n_q, compiled.block_size)
            causal = n_blk * (n_blk + 1) / 2 * query.shape[0] * query.shape[1]
            stats.report(layer_idx, causal, causal, kernel="sdpa")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]

    block_size = compiled.block_size
    if window:
        out = sparse_attention(plan, query, key, value, block_size, scaling, kernel_backend(backend), None, layer_idx=layer_idx, window=window)
        return out.transpose(1, 2).contiguous()
    backend = kernel_backend(backend)
    if _graphable(module.config, query, key, value, attention_mask, backend, block_size):
        graphed = graphs.graph_for(
            compiled.graphs, (layer_idx, tuple(query.shape), tuple(key.shape), query.dtype, query.device, scaling),
            lambda q, k, v: sparse_attention(plan, q, k, v, block_size, scaling, backend, graphed=True), query, key, value,
        )
        if graphed is not None:
            return graphed(query, key, value).transpose(1, 2).contiguous()
    out = sparse_attention(plan, query, key, value, block_size, scaling, backend, mask, layer_idx=layer_idx)
    return out.transpose(1, 2).contiguous()


def sparse_attention(
    plan: LayerPlan, query, key, value, block_size: int, scaling, backend: str, attn_mask=None, graphed: bool = False,
    layer_idx: int = 0, window: int = 0,
) -> torch.Tensor:
    """One layer's sparse prefill: its layout (blocks and token columns), finished and run by the kernels. ``graphed``:
    for capture in a CUDA graph, nothing is read back (full-width ids; the tiles follow the calibrated density).
    ``window``: the model's sliding window, which clips the layout and the token columns; sparsity is then counted
    against the blocks the window reaches."""
    rows = window_blocks(window, block_size)
    static = static_layout_key(plan, query, block_size, window, graphed)
    cached = plan.static_layouts.get(static) if static is not None else None
    columns = None
    if cached is not None:
        counts, ids, density = cached
    else:
        keep, cols = layer_layout(plan, query, key, block_size, finished=False, columns=True)
        if cols is not None:
            keep, col_counts = column_reads(keep, cols, block_size, plan.dense_rows)
            columns = (cols, col_counts, keep)
        counts, ids, density = finalize_ragged(keep, "torch" if backend == "torch" else "auto", plan.dense_rows, sync=not graphed, window_rows=rows)
        if static is not None:
            _remember_static(plan, static, (counts, ids, density))
    if graphed:
        density = plan.density if plan.density is not None else 0.25
    elif stats.is_recording():  # every kept block is causal: kept / causal blocks from the counts, columns as tiles
        n_blk = counts.shape[-1]
        kept = counts.sum() + (column_tiles(columns[1], block_size).sum() if columns is not None else 0)
        kernel = prefill_kernel(query, key, value, block_size, attn_mask, columns, backend, window=window)
        reach = window_band_blocks(n_blk, rows) if window else n_blk * (n_blk + 1) / 2
        stats.report(layer_idx, kept.item(), reach * counts.shape[0] * counts.shape[1], kernel=kernel)
    return sparse_prefill(
        query, key, value, counts, ids, block_size, scale=scaling, attn_mask=attn_mask, backend=backend, density=density,
        columns=columns, window=window,
    )


MAX_STATIC_LAYOUTS = 4  # prompt shapes whose finished static layout a layer keeps (the oldest go first)


def static_layout_key(plan: LayerPlan, query, block_size: int, window: int, graphed: bool) -> tuple | None:
    """The key under which a layer whose heads' layouts depend on positions alone (dense and streaming heads) keeps
    its finished layout: the same prompt shape finishes the same layout, so it is built once. None for a layer with a
    data-dependent head, and for a graphed call (its layout lives in the graph)."""
    if graphed or not all(group.kind.static for group in plan.groups):
        return None
    return (tuple(query.shape), block_size, window, query.device)


def _remember_static(plan: LayerPlan, key: tuple, layout: tuple) -> None:
    plan.static_layouts[key] = layout
    while len(plan.static_layouts) > MAX_STATIC_LAYOUTS:
        plan.static_layouts.popitem(last=False)


def _graphable(config, query, key, value, attention_mask, backend, block_size) -> bool:
    """Whether this prefill may run as a CUDA graph (see :mod:`patchattn.graphs`)."""
    if not getattr(config, GRAPHS_KEY, False) or not query.is_cuda or backend == "torch" or attention_mask is not None:
        return False
    if query.shape[2] > graphs.MAX_TOKENS or stats.is_recording() or torch.cuda.is_current_stream_capturing():
        return False
    return triton_prefill_unsupported(query, key, value, block_size) is None
