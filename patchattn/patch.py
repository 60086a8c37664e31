"""The patch: one attention function registered with transformers, dispatching per layer and head.

``patch(model, recipe)`` stores the recipe (as plain data) on the model's config and selects the
``"patchattn"`` attention implementation; no modeling file or class is touched. The function reads the
recipe from ``module.config`` at call time, so a model saved with the recipe in its config and
``attn_implementation="patchattn"`` loads back patched once patchattn is imported.

Prefill calls (as many queries as keys) run the recipe's block layouts through the sparse kernels.
When the recipe's KV plans keep or read less than the full cache (streaming KV heads, SnapKV budgets, Quest
page budgets), a forward pre-hook on the model gives every cached forward (``generate`` included) a
:class:`~patchattn.cache.HeadBudgetCache` in place of an empty ``DynamicCache``; the attention function then
compresses the prompt's keys and values after prefill and runs each decode step through the page-sparse
decode kernel. Everything else (no cache, padded batches, dropout, softcapping) runs transformers' own SDPA.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import graphs, stats
from .cache import HeadBudgetCache
from .errors import UnsupportedModelError
from .kernels import BACKENDS, finalize_ragged, prefill_kernel, sparse_prefill, sparse_prefill_triton, triton_prefill_unsupported
from .layout import column_counts, column_tiles, finalize, num_blocks, window_blocks
from .recipe import Recipe
from .strategies import Strategy

logger = logging.getLogger(__name__)

ATTN_NAME = "patchattn"
RECIPE_KEY = "patchattn_recipe"
BACKEND_KEY = "patchattn_backend"
ORIGINAL_KEY = "patchattn_original_attn"
GRAPHS_KEY = "patchattn_cuda_graphs"
HOOKS_ATTR = "_patchattn_cache_hooks"

# The head-budgeted cache of the forward running now (set by the model's pre-hook, cleared after it).
_ACTIVE_CACHE: contextvars.ContextVar[HeadBudgetCache | None] = contextvars.ContextVar("patchattn_cache", default=None)


@dataclass
class HeadGroup:
    """The heads of one layer whose strategies share a class: one estimate, one vectorized layout."""

    strategies: list[Strategy]  # one per head, in head order
    head_ids: torch.Tensor  # query heads of this group, ascending (CPU)
    all_heads: bool  # the group is the whole layer (no head selection needed)
    _on_device: dict = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> type[Strategy]:
        return type(self.strategies[0])

    def head_ids_on(self, device: torch.device) -> torch.Tensor:
        ids = self._on_device.get(device)
        if ids is None:
            ids = self._on_device[device] = self.head_ids.to(device)
        return ids


@dataclass
class LayerPlan:
    groups: list[HeadGroup]
    all_dense: bool
    dense_rows: int = 0  # the recipe's dense prefix, in query blocks
    density: float | None = None  # the heads' mean calibrated density (None when the recipe has none)


class CompiledRecipe:
    """A recipe turned into per-layer head groups (one per strategy class), cached per recipe dict."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.block_size = recipe.block_size
        self.layers: list[LayerPlan] = []
        for heads in recipe.layers:
            by_kind: dict[type[Strategy], list[tuple[int, Strategy]]] = {}
            for h, plan in enumerate(heads):
                strategy = plan.build()
                by_kind.setdefault(type(strategy), []).append((h, strategy))
            groups = [
                HeadGroup([s for _, s in members], torch.tensor([h for h, _ in members]), len(members) == len(heads))
                for members in by_kind.values()
            ]
            known = [plan.density for plan in heads if plan.density is not None]
            density = sum(known) / len(known) if known and len(known) == len(heads) else None
            self.layers.append(LayerPlan(groups, all(g.kind.name == "dense" for g in groups), recipe.dense_prefix_rows(), density))
        self.graphs: dict = {}  # CUDA graphs of short prefills, by (layer, shapes, dtype, device, scale)


_COMPILED: "OrderedDict[int, tuple[dict, CompiledRecipe]]" = OrderedDict()
_COMPILED_MAX = 16
_CAPTURE_HOOKS: list[Callable] = []


def _compiled_for(config) -> CompiledRecipe | None:
    data = getattr(config, RECIPE_KEY, None)
    if data is None:
        return None
    hit = _COMPILED.get(id(data))
    if hit is None or hit[0] is not data:
        hit = (data, CompiledRecipe(Recipe.from_dict(data)))
        _COMPILED[id(data)] = hit
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return hit[1]


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
    cache = _ACTIVE_CACHE.get()
    cache_layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
    backend = getattr(module.config, BACKEND_KEY, "auto")
    if cache_layer is not None and cache_layer.incoming is not None:  # decode steps: the budgeted cache
        return cache_layer.attend(query, scaling, backend), None
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


def _prefill_attention(module, query, key, value, attention_mask, scaling, dropout, layer_idx, backend, **kwargs):
    compiled = _compiled_for(module.config)
    n_q, n_k = query.shape[2], key.shape[2]
    window = _model_window(attention_mask, n_q, n_k, kwargs)
    prefill = compiled is not None and n_q == n_k and n_q > compiled.block_size
    sparse_ok = prefill and dropout == 0.0 and kwargs.get("softcap") is None and not kwargs.get("output_attentions")
    sparse_ok = sparse_ok and n_q >= compiled.recipe.min_sparse_tokens
    plan = compiled.layers[layer_idx] if sparse_ok else None
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
        out = _sparse_attention(plan, query, key, value, block_size, scaling, backend, None, layer_idx=layer_idx, window=window)
        return out.transpose(1, 2).contiguous()
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
    rows = window_blocks(window, block_size)
    counts, ids, density = finalize_ragged(keep, "torch" if backend == "torch" else "auto", plan.dense_rows, sync=not graphed, window_rows=rows)
    columns = None
    if cols is not None:
        columns = (cols, column_counts(cols, counts.shape[-1], block_size, plan.dense_rows), keep)
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


def _is_padded(attention_mask) -> bool:
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and not bool(attention_mask.all())


MAX_KV_KEPT = 0.9  # plans keeping more of a prompt than this (and no Quest heads): the full cache is the better deal


def _worth_budgeting(kv_plans, n_tokens: int) -> bool:
    """Whether the head-budgeted cache pays on a prompt of ``n_tokens``: it holds at most 90% of the prompt's keys
    and values, or some head reads Quest-selected pages. Short prompts under long windows keep nearly everything,
    and then the full cache decodes faster and, having no page headroom, holds less."""
    plans = [p for layer in kv_plans for p in layer]
    if not plans or n_tokens <= 0 or any(p.decode_pages > 0 for p in plans):
        return bool(plans)
    return sum(p.kept_tokens(n_tokens) for p in plans) <= MAX_KV_KEPT * n_tokens * len(plans)


def _budget_cache_for(model, kwargs) -> HeadBudgetCache | None:
    """The head-budgeted cache this forward of a patched model runs with: the one it was given, or a new one in
    place of an empty ``DynamicCache`` (written into ``kwargs``) when its recipe compresses the KV cache."""
    cache = kwargs.get("past_key_values")
    if isinstance(cache, HeadBudgetCache):
        return cache
    compiled = _compiled_for(model.config)
    use_cache = kwargs.get("use_cache")
    use_cache = getattr(model.config, "use_cache", True) if use_cache is None else use_cache
    fresh = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
    if compiled is None or not use_cache or not fresh or not compiled.recipe.compresses_kv:
        return None
    prompt = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if prompt is not None and not _worth_budgeting(compiled.recipe.kv_plans(), prompt.shape[1]):
        logger.debug("a %d-token prompt: the KV plans would keep over %.0f%% of it, using the full cache", prompt.shape[1], 100 * MAX_KV_KEPT)
        return None
    if _is_padded(kwargs.get("attention_mask")):
        logger.warning("padded batch: the head-budgeted KV cache needs unpadded rows, using the full cache")
        return None
    cache = kwargs["past_key_values"] = HeadBudgetCache.from_recipe(compiled.recipe, model.config)
    return cache


def _install_cache_hooks(model) -> None:
    if getattr(model, HOOKS_ATTR, None):
        return
    tokens: list = []

    def pre(module, args, kwargs):
        tokens.append(_ACTIVE_CACHE.set(_budget_cache_for(module, kwargs)))
        return args, kwargs

    def post(module, args, kwargs, output):
        if tokens:
            _ACTIVE_CACHE.reset(tokens.pop())
        return output

    handles = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True, always_call=True),
    ]
    setattr(model, HOOKS_ATTR, handles)


def _remove_cache_hooks(model) -> None:
    for handle in getattr(model, HOOKS_ATTR, None) or []:
        handle.remove()
    if hasattr(model, HOOKS_ATTR):
        delattr(model, HOOKS_ATTR)


def _plain_sliding_prefill(kwargs) -> bool:
    """Whether transformers asks for the mask of an unpadded prefill under the model's own sliding window, and nothing
    else (no chunked attention, packed sequences or extra mask functions: those turn ``allow_is_causal_skip`` off)."""
    config = kwargs.get("config")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
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
    if not getattr(model, "_supports_attention_backend", False):
        from .models import _unsupported_message

        raise UnsupportedModelError(_unsupported_message(type(model).__name__))


def patch(model, recipe: Recipe, backend: str = "auto", cuda_graphs: bool | None = None):
    """Make ``model`` run ``recipe``'s sparse attention. Returns the model (changed in place).

    ``backend``: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"torch"`` or ``"triton"``. ``cuda_graphs``: replay
    each layer's short-prompt prefill attention as a CUDA graph (:mod:`patchattn.graphs`; default: the
    ``PATCHATTN_CUDA_GRAPHS`` environment variable, else off)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    check_supported(model)
    recipe.check_model(model.config)
    config = model.config
    if getattr(config, RECIPE_KEY, None) is None:
        setattr(config, ORIGINAL_KEY, config._attn_implementation or "sdpa")
    setattr(config, RECIPE_KEY, recipe.to_dict())
    setattr(config, BACKEND_KEY, backend)
    setattr(config, GRAPHS_KEY, graphs.enabled_by_env() if cuda_graphs is None else bool(cuda_graphs))
    model.set_attn_implementation(ATTN_NAME)
    _install_cache_hooks(model)
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
    _remove_cache_hooks(model)
    return model


def _drop_graphs(config) -> None:
    """Release the CUDA graphs (and the memory they hold) of the recipe on ``config``: the compiled recipe itself stays
    cached for the next patch with the same recipe data, its graphs would otherwise outlive the patch."""
    compiled = _compiled_for(config)
    if compiled is not None:
        compiled.graphs.clear()


def is_patched(model) -> bool:
    return getattr(model.config, RECIPE_KEY, None) is not None


@contextlib.contextmanager
def patched(model, recipe: Recipe | None, backend: str = "auto", cuda_graphs: bool | None = None):
    """Run a block with ``recipe`` applied (``None``: the model as it is), then restore the model exactly."""
    if recipe is None:
        yield model
        return
    config = model.config
    keys = (RECIPE_KEY, BACKEND_KEY, ORIGINAL_KEY, GRAPHS_KEY)
    saved = {k: getattr(config, k) for k in keys if hasattr(config, k)}
    saved_impl = config._attn_implementation
    had_hooks = bool(getattr(model, HOOKS_ATTR, None))
    patch(model, recipe, backend, cuda_graphs)
    try:
        yield model
    finally:
        if not had_hooks:
            _remove_cache_hooks(model)
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
