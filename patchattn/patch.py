"""The patch: one attention function registered with transformers, dispatching per layer and head.

``patch(model, recipe)`` stores the recipe (as plain data, :mod:`patchattn.config_keys`) on the model's config and
selects the ``"patchattn"`` attention implementation; no modeling file or class is touched. The function finds the
recipe's compiled form (:mod:`patchattn.compiled`, built once per recipe) from ``module.config`` at call time, so a
model saved with the recipe in its config and ``attn_implementation="patchattn"`` loads back patched once patchattn
is imported.

Prefill calls (as many queries as keys) run the recipe's block layouts through the sparse kernels
(:mod:`patchattn.prefill`; the model's own sliding window: :mod:`patchattn.sliding_window`, whose mask builder is
registered here too). When the recipe's KV plans keep or read less than the full cache (streaming KV heads, SnapKV
budgets, Quest page budgets), the model's forward hooks (:mod:`patchattn.cache_hooks`) give every cached forward
(``generate`` included) a :class:`~patchattn.cache.HeadBudgetCache` in place of a fresh one; the attention function
then compresses the prompt's keys and values after prefill and runs each decode step through the page-sparse decode
kernel. Everything else (no cache, padded batches, dropout, softcapping) runs transformers' own SDPA.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from transformers import AttentionInterface

from . import cache_hooks, config_keys, decode_graphs, graphs, hf
from .backends import PATCH_BACKENDS, kernel_backend, quality_backend  # noqa: F401  (imported from here too)
from .compiled import CompiledRecipe, compile_recipe, compiled_for  # noqa: F401  (CompiledRecipe: public here too)
from .config_keys import ATTN_NAME, BACKEND_KEY, GRAPHS_KEY, ORIGINAL_KEY, RECIPE_KEY  # noqa: F401  (imported from here too)
from .errors import UnsupportedModelError
from .prefill import layer_layout, prefill_attention  # noqa: F401  (layer_layout: imported from here too)
from .recipe import Recipe
from .sliding_window import mask_for_patchattn

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "auto"  # the backend of patch() and patched() when none is named (read at call time)
_CAPTURE_HOOKS: list[Callable] = []


def patchattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-function contract: q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> ((B, Nq, Hq, D), None)."""
    for hook in _CAPTURE_HOOKS:
        hook(module, query, key, value)
    layer_idx = getattr(module, "layer_idx", 0) or 0
    # traced by torch.compile (generate's compile path decoding on the full cache): no budgeted cache is active there
    cache = None if torch.compiler.is_compiling() else cache_hooks.active_cache()
    cache_layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
    backend = getattr(module.config, BACKEND_KEY, None) or DEFAULT_BACKEND  # None: loaded patched, without patch()
    if cache_layer is not None and cache_layer.incoming is not None:  # decode steps: the budgeted cache
        return cache_layer.attend(query, scaling, kernel_backend(backend)), None
    out = prefill_attention(module, query, key, value, attention_mask, scaling, dropout, layer_idx, backend, **kwargs)
    if cache_layer is not None and cache_layer.pending is not None:
        cache_layer.prefill_attended(query, scaling)
    return out, None


def register() -> None:
    """Register the attention function and its mask builder (transformers' SDPA one, but for a plain sliding-window
    prefill: :func:`patchattn.sliding_window.mask_for_patchattn`). Idempotent."""
    AttentionInterface.register(ATTN_NAME, patchattn_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, mask_for_patchattn)
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
    compiled = compile_recipe(recipe)
    compiled.reset_notices()
    cuda_graphs = graphs.enabled_by_env() if cuda_graphs is None else bool(cuda_graphs)
    config_keys.write(model.config, compiled.data, backend, cuda_graphs)
    model.set_attn_implementation(ATTN_NAME)
    cache_hooks.install(model)
    decode_graphs.install(model)
    logger.info("patched %s with recipe %r (%s)", type(model).__name__, recipe.name, recipe.strategy_counts())
    return model


def unpatch(model):
    """Undo :func:`patch`: the original attention implementation, no recipe on the config."""
    config = model.config
    original = getattr(config, ORIGINAL_KEY, None) or "sdpa"
    _drop_graphs(config)
    config_keys.clear(config)
    model.set_attn_implementation(original)
    cache_hooks.remove(model)
    decode_graphs.remove(model)
    return model


def _drop_graphs(config) -> None:
    """Release the CUDA graphs (and the memory they hold) of the recipe on ``config``: the compiled recipe itself stays
    cached for the next patch with the same recipe, its graphs would otherwise outlive the patch."""
    compiled = compiled_for(config)
    if compiled is not None:
        compiled.graphs.clear()
        for layer in compiled.layers:
            layer.static_layouts.clear()


def is_patched(model) -> bool:
    return config_keys.recipe_data(model.config) is not None


@contextlib.contextmanager
def patched(model, recipe: Recipe | None, backend: str | None = None, cuda_graphs: bool | None = None):
    """Run a block with ``recipe`` applied (``None``: the model as it is), then restore the model exactly."""
    if recipe is None:
        yield model
        return
    config = model.config
    saved = config_keys.saved(config)
    saved_impl = config._attn_implementation
    had_hooks = bool(getattr(model, cache_hooks.HOOKS_ATTR, None))
    patch(model, recipe, backend, cuda_graphs)
    try:
        yield model
    finally:
        if not had_hooks:
            cache_hooks.remove(model)
            decode_graphs.remove(model)
        _drop_graphs(config)
        config_keys.restore(config, saved)
        model.set_attn_implementation(saved_impl)


@contextlib.contextmanager
def capture(hook: Callable):
    """Call ``hook(module, query, key, value)`` on every attention call of models running ``"patchattn"``."""
    _CAPTURE_HOOKS.append(hook)
    try:
        yield
    finally:
        _CAPTURE_HOOKS.remove(hook)
