"""The patch: one attention function registered with transformers, dispatching per layer and head.

``patch(model, recipe)`` stores the recipe (as plain data) on the model's config and selects the
``"patchattn"`` attention implementation; no modeling file or class is touched. The function reads the
recipe from ``module.config`` at call time, so a model saved with the recipe in its config and
``attn_implementation="patchattn"`` loads back patched once patchattn is imported.

Prefill calls (as many queries as keys) run the recipe's block layouts through the sparse kernels;
everything else (decoding, chunked prefill, dropout, softcapping) runs transformers' own SDPA path.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import stats
from .errors import UnsupportedModelError
from .kernels import BACKENDS, sparse_prefill
from .layout import block_density, causal_blocks, num_blocks, to_indices
from .recipe import Recipe
from .strategies import Strategy

logger = logging.getLogger(__name__)

ATTN_NAME = "patchattn"
RECIPE_KEY = "patchattn_recipe"
BACKEND_KEY = "patchattn_backend"
ORIGINAL_KEY = "patchattn_original_attn"


@dataclass
class HeadGroup:
    strategy: Strategy
    head_ids: torch.Tensor  # query heads using this strategy, ascending


@dataclass
class LayerPlan:
    groups: list[HeadGroup]
    all_dense: bool


class CompiledRecipe:
    """A recipe turned into per-layer head groups, cached per recipe dict."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.block_size = recipe.block_size
        self.layers: list[LayerPlan] = []
        for heads in recipe.layers:
            by_strategy: dict[Strategy, list[int]] = {}
            for h, plan in enumerate(heads):
                by_strategy.setdefault(plan.build(), []).append(h)
            groups = [HeadGroup(s, torch.tensor(ids)) for s, ids in by_strategy.items()]
            self.layers.append(LayerPlan(groups, all(g.strategy.name == "dense" for g in groups)))


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


def layer_layout(plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, block_size: int) -> torch.Tensor:
    """The (B, Hq, nqb, nkb) layout of one layer: each head group's strategy on its own heads."""
    batch, n_q_heads, n_tokens, _ = query.shape
    group_size = n_q_heads // key.shape[1]
    n_blk = num_blocks(n_tokens, block_size)
    keep = torch.empty(batch, n_q_heads, n_blk, n_blk, dtype=torch.bool, device=query.device)
    for group in plan.groups:
        head_ids = group.head_ids.to(query.device)
        keep[:, head_ids] = group.strategy.block_layout(
            query[:, head_ids], key[:, head_ids // group_size], block_size
        )
    return keep


def patchattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-function contract: q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> ((B, Nq, Hq, D), None)."""
    for hook in _CAPTURE_HOOKS:
        hook(module, query, key, value)
    compiled = _compiled_for(module.config)
    n_q, n_k = query.shape[2], key.shape[2]
    layer_idx = getattr(module, "layer_idx", 0) or 0
    prefill = compiled is not None and n_q == n_k and n_q > compiled.block_size
    sparse_ok = prefill and dropout == 0.0 and kwargs.get("softcap") is None and not kwargs.get("output_attentions")
    plan = compiled.layers[layer_idx] if sparse_ok else None
    if plan is None or plan.all_dense:
        if prefill and stats.is_recording():
            n_blk = num_blocks(n_q, compiled.block_size)
            causal = n_blk * (n_blk + 1) / 2 * query.shape[0] * query.shape[1]
            stats.report(layer_idx, causal, causal)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    block_size = compiled.block_size
    keep = layer_layout(plan, query, key, block_size)
    counts, ids = to_indices(keep)
    if stats.is_recording():
        n_causal = causal_blocks(keep.shape[-1], keep.device).sum().item()
        stats.report(layer_idx, block_density(keep).sum().item() * n_causal, n_causal * keep.shape[0] * keep.shape[1])
    backend = getattr(module.config, BACKEND_KEY, "auto")
    out = sparse_prefill(query, key, value, counts, ids, block_size, scale=scaling, attn_mask=_bool_mask(attention_mask), backend=backend)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the attention function (and transformers' SDPA mask builder for it). Idempotent."""
    AttentionInterface.register(ATTN_NAME, patchattn_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    except ImportError:  # older transformers build masks from the implementation name alone
        pass


register()


def check_supported(model) -> None:
    if not getattr(model, "_supports_attention_backend", False):
        from .models import _unsupported_message

        raise UnsupportedModelError(_unsupported_message(type(model).__name__))


def patch(model, recipe: Recipe, backend: str = "auto"):
    """Make ``model`` run ``recipe``'s sparse attention. Returns the model (changed in place).

    ``backend``: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"torch"`` or ``"triton"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    check_supported(model)
    recipe.check_model(model.config)
    config = model.config
    if getattr(config, RECIPE_KEY, None) is None:
        setattr(config, ORIGINAL_KEY, config._attn_implementation or "sdpa")
    setattr(config, RECIPE_KEY, recipe.to_dict())
    setattr(config, BACKEND_KEY, backend)
    model.set_attn_implementation(ATTN_NAME)
    logger.info("patched %s with recipe %r (%s)", type(model).__name__, recipe.name, recipe.strategy_counts())
    return model


def unpatch(model):
    """Undo :func:`patch`: the original attention implementation, no recipe on the config."""
    config = model.config
    original = getattr(config, ORIGINAL_KEY, None) or "sdpa"
    for key in (RECIPE_KEY, BACKEND_KEY, ORIGINAL_KEY):
        if hasattr(config, key):
            delattr(config, key)
    model.set_attn_implementation(original)
    return model


def is_patched(model) -> bool:
    return getattr(model.config, RECIPE_KEY, None) is not None


@contextlib.contextmanager
def patched(model, recipe: Recipe | None, backend: str = "auto"):
    """Run a block with ``recipe`` applied (``None``: the model as it is), then restore the model exactly."""
    if recipe is None:
        yield model
        return
    config = model.config
    keys = (RECIPE_KEY, BACKEND_KEY, ORIGINAL_KEY)
    saved = {k: getattr(config, k) for k in keys if hasattr(config, k)}
    saved_impl = config._attn_implementation
    patch(model, recipe, backend)
    try:
        yield model
    finally:
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
