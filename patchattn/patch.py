"""The patch: one attention function registered with transformers, dispatching per layer and head.

``patch(model, recipe)`` stores the recipe (as plain data) on the model's config and selects the
``"patchattn"`` attention implementation; no modeling file or class is touched. The function reads the
recipe from ``module.config`` at call time, so a model saved with the recipe in its config and
``attn_implementation="patchattn"`` loads back patched once patchattn is imported.

Prefill calls (as many queries as keys) run the recipe's block layouts through the sparse kernels.
When the recipe's KV plans keep or read less than the full cache (streaming KV heads, SnapKV budgets, Quest
page budgets), the model's forward hooks (:mod:`patchattn.cache_hooks`) give every cached forward (``generate``
included) a :class:`~patchattn.cache.HeadBudgetCache` in place of a fresh one; the attention function then
compresses the prompt's keys and values after prefill and runs each decode step through the page-sparse
decode kernel. Everything else (no cache, padded batches, dropout, softcapping) runs transformers' own SDPA.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import cache_hooks, graphs, hf, stats
from .compiled import RECIPE_KEY, CompiledRecipe, HeadGroup, LayerPlan, compiled_for  # noqa: F401  (CompiledRecipe: public here too)
from .errors import UnsupportedModelError
from .kernels import BACKENDS, finalize_ragged, prefill_kernel, sparse_prefill, sparse_prefill_triton, triton_prefill_unsupported
from .layout import column_reads, column_tiles, finalize, num_blocks, window_blocks
from .recipe import Recipe

logger = logging.getLogger(__name__)

ATTN_NAME = "patchattn"
BACKEND_KEY = "patchattn_backend"
ORIGINAL_KEY = "patchattn_original_attn"
GRAPHS_KEY = "patchattn_cuda_graphs"
_CAPTURE_HOOKS: list[Callable] = []

# What ``patch(..., backend=...)`` accepts. "auto": the fastest correct path, the sparse kernels where they take the
# input and dense attention where they cannot (a CPU, float32, a padded mask: the PyTorch reference would be slower
# than dense), said once; "sparse": always the recipe's layouts, the kernels where they take the input and the PyTorch
# reference elsewhere (what calibration and eval's quality tasks run: the recipe's quality on any device); "torch",
# "triton": that implementation of the layouts.
PATCH_BACKENDS = ("auto", "sparse", *(b for b in BACKENDS if b != "auto"))
DEFAULT_BACKEND = "auto"  # the backend of patch() and patched() when none is named


def kernel_backend(backend: str) -> str:
    """The kernels' own backend (:data:`patchattn.kernels.BACKENDS`) for a patch backend."""
    return "auto" if backend in ("auto", "sparse") else backend


def quality_backend(backend: str) -> str:
    """The backend that measures a recipe's quality for a user's ``backend``: its layouts always run ("auto" becomes
    "sparse"), whatever this device's speed."""
    return "sparse" if backend == "auto" else backend


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
    batch, n_q_heads, n_tokens, _ = query.shape
    group_size = n_q_heads // key.shape[1]
    cols = None
    if len(plan.groups) == 1 and plan.groups[0].all_heads:
        keep, cols = _group_layout(plan.groups[0], query, key, block_size, group_size)
    else:
        n_blk = num_blocks(n_tokens, block_size)
        keep = torch.empty(batch, n_q_heads, n_blk, n_blk, dtype=torch.bool, device=query.device)
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


def patchattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-function contract: q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> ((B, Nq, Hq, D), None)."""
    for hook in _CAPTURE_HOOKS:
        hook(module, query, key, value)
    layer_idx = getattr(module, "layer_idx", 0) or 0
    cache = cache_hooks.active_cache()
    cache_layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
    backend = getattr(module.config, BACKEND_KEY, None) or DEFAULT_BACKEND  # None: loaded patched, without patch()
    if cache_layer is not None and cache_layer.incoming is not None:  # decode steps: the budgeted cache
        return cache_layer.attend(query, scaling, kernel_backend(backend)), None
    out = _prefill_attention(module, query, key, value, attention_mask, scaling, dropout, layer_idx, backend, **kwargs)
    if cache_layer is not None and cache_layer.pending is not None:
        cache_layer.finish_prefill(query, scaling)
    return out, None


def _model_window(attention_mask, n_q: int, n_k: int, kwargs) -> int:
    """The model's sliding window this call must apply itself (0: none): the mask builder registered for patchattn
    (:func:`_mask_for_patchattn`) leaves a plain sliding-window prefill's mask out, and the layer names its window."""
    window = kwargs.get("sliding_window") or 0
    return int(window) if attention_mask is None and window and n_q == n_k and n_k > window else 0


def _window_band_blocks(n_blk: int, window_rows: int) -> int:
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


def _windowed_dense(module, query, key, value, scaling, dropout, window, layer_idx, block_size, backend, kwargs):
    """Dense attention under the model's sliding window (no mask given): the Triton kernel over the window's blocks
    where it runs (what the window saves, unlike SDPA with a mask; the Hopper kernel takes no window), else SDPA with
    the window as a mask."""
    n = query.shape[2]
    rows = window_blocks(window, block_size)
    use_kernel = backend != "torch" and dropout == 0.0 and kwargs.get("softcap") is None
    use_kernel = use_kernel and triton_prefill_unsupported(query, key, value, block_size) is None
    if stats.is_recording():
        band = _window_band_blocks(num_blocks(n, block_size), rows) * query.shape[0] * query.shape[1]
        stats.report(layer_idx, band, band, kernel="triton" if use_kernel else "sdpa")
    if use_kernel:
        counts, ids, density = _window_layout(query.shape[0], query.shape[1], num_blocks(n, block_size), rows, query.device)
        out = sparse_prefill_triton(query, key, value, counts, ids, block_size, scale=scaling, density=density, window=window)
        return out.transpose(1, 2).contiguous()
    pos = torch.arange(n, device=query.device)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    return sdpa_attention_forward(module, query, key, value, mask[None, None], dropout=dropout, scaling=scaling, **kwargs)[0]


def _say_dense_below(compiled: CompiledRecipe, n_tokens: int) -> None:
    """Once per patched recipe: a prompt shorter than the recipe's ``min_sparse_tokens`` prefills densely."""
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


def _say_no_kernel(compiled: CompiledRecipe, reason: str) -> None:
    """Once per patched recipe: the sparse kernels cannot take this prefill, so it runs dense (backend "auto")."""
    if compiled.said_no_kernel:
        return
    compiled.said_no_kernel = True
    logger.warning("patchattn: the sparse prefill kernels cannot run here (%s), and the PyTorch reference is slower than "
                   "dense attention: prefilling densely, so recipe %s saves no time on this device; backend='sparse' "
                   "runs its layouts anyway (to measure its quality)", reason, compiled.recipe.name or "(unnamed)")


def _prefill_attention(module, query, key, value, attention_mask, scaling, dropout, layer_idx, backend, **kwargs):
    compiled = compiled_for(module.config)
    n_q, n_k = query.shape[2], key.shape[2]
    window = _model_window(attention_mask, n_q, n_k, kwargs)
    prefill = compiled is not None and n_q == n_k and n_q > compiled.block_size
    sparse_ok = prefill and dropout == 0.0 and kwargs.get("softcap") is None and not kwargs.get("output_attentions")
    if sparse_ok and n_q < compiled.recipe.min_sparse_tokens:
        _say_dense_below(compiled, n_q)
        sparse_ok = False
    plan = compiled.layers[layer_idx] if sparse_ok else None
    if plan is not None and not plan.all_dense and backend == "auto":
        no_kernel = triton_prefill_unsupported(query, key, value, compiled.block_size, _bool_mask(attention_mask))
        if no_kernel is not None:  # the reference would lose to dense attention: dense, said once
            _say_no_kernel(compiled, no_kernel)
            plan = None
    if plan is None or plan.all_dense:
        if window:
            block_size = compiled.block_size if compiled is not None else 64
            return _windowed_dense(module, query, key, value, scaling, dropout, window, layer_idx, block_size, backend, kwargs)
        if prefill and stats.is_recording():
            n_blk = num_blocks(n_q, compiled.block_size)
            causal = n_blk * (n_blk + 1) / 2 * query.shape[0] * query.shape[1]
            stats.report(layer_idx, causal, causal, kernel="sdpa")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]

    block_size = compiled.block_size
    if window:
        out = _sparse_attention(plan, query, key, value, block_size, scaling, kernel_backend(backend), None, layer_idx=layer_idx, window=window)
        return out.transpose(1, 2).contiguous()
    backend = kernel_backend(backend)
    if _graphable(module.config, query, key, value, attention_mask, backend, block_size):
        graphed = graphs.graph_for(
            compiled.graphs, (layer_idx, tuple(query.shape), tuple(key.shape), query.dtype, query.device, scaling),
            lambda q, k, v: _sparse_attention(plan, q, k, v, block_size, scaling, backend, graphed=True), query, key, value,
        )
        if graphed is not None:
            return graphed(query, key, value).transpose(1, 2).contiguous()
    out = _sparse_attention(plan, query, key, value, block_size, scaling, backend, _bool_mask(attention_mask), layer_idx=layer_idx)
    return out.transpose(1, 2).contiguous()


def _sparse_attention(
    plan: LayerPlan, query, key, value, block_size: int, scaling, backend: str, attn_mask=None, graphed: bool = False,
    layer_idx: int = 0, window: int = 0,
) -> torch.Tensor:
    """One layer's sparse prefill: its layout (blocks and token columns), finished and run by the kernels. ``graphed``:
    for capture in a CUDA graph, nothing is read back (full-width ids; the tiles follow the calibrated density).
    ``window``: the model's sliding window, which clips the layout and the token columns; sparsity is then counted
    against the blocks the window reaches."""
    keep, cols = layer_layout(plan, query, key, block_size, finished=False, columns=True)
    columns = None
    if cols is not None:
        keep, col_counts = column_reads(keep, cols, block_size, plan.dense_rows)
        columns = (cols, col_counts, keep)
    rows = window_blocks(window, block_size)
    counts, ids, density = finalize_ragged(keep, "torch" if backend == "torch" else "auto", plan.dense_rows, sync=not graphed, window_rows=rows)
    if graphed:
        density = plan.density if plan.density is not None else 0.25
    elif stats.is_recording():  # every kept block is causal: kept / causal blocks from the counts, columns as tiles
        n_blk = counts.shape[-1]
        kept = counts.sum() + (column_tiles(columns[1], block_size).sum() if columns is not None else 0)
        kernel = prefill_kernel(query, key, value, block_size, attn_mask, columns, backend, window=window)
        reach = _window_band_blocks(n_blk, rows) if window else n_blk * (n_blk + 1) / 2
        stats.report(layer_idx, kept.item(), reach * counts.shape[0] * counts.shape[1], kernel=kernel)
    return sparse_prefill(
        query, key, value, counts, ids, block_size, scale=scaling, attn_mask=attn_mask, backend=backend, density=density,
        columns=columns, window=window,
    )


def _graphable(config, query, key, value, attention_mask, backend, block_size) -> bool:
    """Whether this prefill may run as a CUDA graph (see :mod:`patchattn.graphs`)."""
    if not getattr(config, GRAPHS_KEY, False) or not query.is_cuda or backend == "torch" or attention_mask is not None:
        return False
    if query.shape[2] > graphs.MAX_TOKENS or stats.is_recording() or torch.cuda.is_current_stream_capturing():
        return False
    return triton_prefill_unsupported(query, key, value, block_size) is None


def _plain_sliding_prefill(kwargs) -> bool:
    """Whether transformers asks for the mask of an unpadded prefill under the model's own sliding window, and nothing
    else (no chunked attention, packed sequences or extra mask functions: those turn ``allow_is_causal_skip`` off)."""
    config = kwargs.get("config")
    text = hf.text_config(config)
    window = kwargs.get("local_size")
    if not window or not kwargs.get("allow_is_causal_skip", True) or text is None or "q_length" not in kwargs:
        return False
    if getattr(text, "sliding_window", None) != window or getattr(text, "attention_chunk_size", None):
        return False
    if kwargs["q_length"] != kwargs.get("kv_length") or kwargs.get("q_offset", 0) or kwargs.get("kv_offset", 0):
        return False
    padding = kwargs.get("attention_mask")
    return padding is None or bool(padding.all())


def _mask_for_patchattn(*args, **kwargs):
    """transformers' SDPA mask builder, except for a plain sliding-window prefill: no mask, and the attention function
    applies the window itself (``sliding_window``), so the kernels compute only the blocks the window reaches."""
    from transformers.masking_utils import sdpa_mask

    if not args and _plain_sliding_prefill(kwargs):
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the attention function (and its mask builder: transformers' SDPA one, see :func:`_mask_for_patchattn`).
    Idempotent."""
    AttentionInterface.register(ATTN_NAME, patchattn_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, _mask_for_patchattn)
    except ImportError:  # older transformers build masks from the implementation name alone
        pass


register()


def check_supported(model) -> None:
    if not hf.supports_attention_registry(model):
        from .models import _unsupported_message

        raise UnsupportedModelError(_unsupported_message(type(model).__name__))


def patch(model, recipe: Recipe, backend: str | None = None, cuda_graphs: bool | None = None):
    """Make ``model`` run ``recipe``'s sparse attention. Returns the model (changed in place).

    ``backend`` (one of :data:`PATCH_BACKENDS`; default :data:`DEFAULT_BACKEND`): ``"auto"`` runs the sparse kernels
    where they take the input and dense attention where they cannot (on a CPU, in float32), saying so once, since the
    PyTorch reference is slower than dense there; ``"sparse"`` always runs the recipe's layouts (the reference where
    no kernel can), which measures a recipe's quality on any device; ``"torch"`` or ``"triton"`` that implementation.
    ``cuda_graphs``: replay each layer's short-prompt prefill attention as a CUDA graph (:mod:`patchattn.graphs`;
    default: the ``PATCHATTN_CUDA_GRAPHS`` environment variable, else off)."""
    backend = DEFAULT_BACKEND if backend is None else backend
    if backend not in PATCH_BACKENDS:
        raise ValueError(f"backend must be one of {PATCH_BACKENDS}, not {backend!r}")
    check_supported(model)
    recipe.check_model(model.config)
    config = model.config
    if getattr(config, RECIPE_KEY, None) is None:
        setattr(config, ORIGINAL_KEY, config._attn_implementation or "sdpa")
    setattr(config, RECIPE_KEY, recipe.to_dict())
    setattr(config, BACKEND_KEY, backend)
    setattr(config, GRAPHS_KEY, graphs.enabled_by_env() if cuda_graphs is None else bool(cuda_graphs))
    model.set_attn_implementation(ATTN_NAME)
    cache_hooks.install(model)
    logger.info("patched %s with recipe %r (%s)", type(model).__name__, recipe.name, recipe.strategy_counts())
    return model


def unpatch(model):
    """Undo :func:`patch`: the original attention implementation, no recipe on the config."""
    config = model.config
    original = getattr(config, ORIGINAL_KEY, None) or "sdpa"
    _drop_graphs(config)
    for key in (RECIPE_KEY, BACKEND_KEY, ORIGINAL_KEY, GRAPHS_KEY):
        if hasattr(config, key):
            delattr(config, key)
    model.set_attn_implementation(original)
    cache_hooks.remove(model)
    return model


def _drop_graphs(config) -> None:
    """Release the CUDA graphs (and the memory they hold) of the recipe on ``config``: the compiled recipe itself stays
    cached for the next patch with the same recipe data, its graphs would otherwise outlive the patch."""
    compiled = compiled_for(config)
    if compiled is not None:
        compiled.graphs.clear()


def is_patched(model) -> bool:
    return getattr(model.config, RECIPE_KEY, None) is not None


@contextlib.contextmanager
def patched(model, recipe: Recipe | None, backend: str | None = None, cuda_graphs: bool | None = None):
    """Run a block with ``recipe`` applied (``None``: the model as it is), then restore the model exactly."""
    if recipe is None:
        yield model
        return
    config = model.config
    keys = (RECIPE_KEY, BACKEND_KEY, ORIGINAL_KEY, GRAPHS_KEY)
    saved = {k: getattr(config, k) for k in keys if hasattr(config, k)}
    saved_impl = config._attn_implementation
    had_hooks = bool(getattr(model, cache_hooks.HOOKS_ATTR, None))
    patch(model, recipe, backend, cuda_graphs)
    try:
        yield model
    finally:
        if not had_hooks:
            cache_hooks.remove(model)
        _drop_graphs(config)
        for k in keys:
            if hasattr(config, k):
                delattr(config, k)
        for k, v in saved.items():
            setattr(config, k, v)
        model.set_attn_implementation(saved_impl)


@contextlib.contextmanager
def capture(hook: Callable):
    """Call ``hook(module, query, key, value)`` on every attention call of models running ``"patchattn"``."""
    _CAPTURE_HOOKS.append(hook)
    try:
        yield
    finally:
        _CAPTURE_HOOKS.remove(hook)
