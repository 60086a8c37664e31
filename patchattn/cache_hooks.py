"""How a patched model's forwards get the head-budgeted KV cache, and the warning when one does not.

transformers offers no supported way for a library to supply its own cache class to ``generate`` (its
``cache_implementation`` is a closed set, checked by ``GenerationConfig.validate``), so a forward pre-hook on the
patched model decides, once per forward and for every caller alike (``generate``, a plain ``model(...,
use_cache=True)``, lm-eval): a fresh cache -- none, or transformers' empty ``DynamicCache`` under whichever keyword
the installed release uses (:mod:`patchattn.hf`) -- becomes a :class:`~patchattn.cache.HeadBudgetCache` when the
recipe compresses the KV cache and the budget pays, its pools sized for the generation's ``max_new_tokens`` when a
``generate`` call runs the forward (:func:`patchattn.hf.generation_new_tokens`), and told each row's left padding, read
off the forward's ``attention_mask`` (:func:`left_padding`), before its prefill. The forward's post-hook checks what
the forward actually ran on: a recipe that compresses the KV cache finishing on any other cache is said once per model
and reason (a logged warning), and :func:`kv_cache_status` tells ``patchattn eval`` so its KV figures are not reported
as the recipe's.
"""

from __future__ import annotations

import contextvars
import logging
import weakref

import torch
from transformers import __version__ as transformers_version
from transformers.cache_utils import DynamicCache, StaticCache

from . import hf
from .cache import HeadBudgetCache
from .chunked import forget_skipped_mask, prompt_end
from .compiled import compiled_for
from .config_keys import ATTN_NAME
from .dense_forward import dense_prefill
from .errors import UnsupportedBatchError

logger = logging.getLogger(__name__)

HOOKS_ATTR = "_patchattn_cache_hooks"
REASON_ATTR = "_patchattn_kv_bypass"  # (weak ref to the cache, reason) of the last forward that ran on another cache
WARNED_ATTR = "_patchattn_kv_warned"  # the reasons already said for this model
MAX_KV_KEPT = 0.9  # plans keeping more of a prompt than this (and no Quest heads): the full cache is the better deal
NOT_LEFT = "a batch padded other than on the left (a row's attention_mask has zeros after its first real token)"

# The head-budgeted cache of the forward running now (set by the model's pre-hook, cleared after it).
_ACTIVE_CACHE: contextvars.ContextVar[HeadBudgetCache | None] = contextvars.ContextVar("patchattn_cache", default=None)


def active_cache() -> HeadBudgetCache | None:
    """The head-budgeted cache of the patched forward running now, if it has one."""
    return _ACTIVE_CACHE.get()


def worth_budgeting(kv_plans, n_tokens: int) -> bool:
    """Whether the head-budgeted cache pays on a prompt of ``n_tokens``: it holds at most 90% of the prompt's keys
    and values, or some head reads Quest-selected pages. Short prompts under long windows keep nearly everything,
    and then the full cache decodes faster and, having no page headroom, holds less."""
    plans = [p for layer in kv_plans for p in layer]
    if not plans or n_tokens <= 0 or any(p.decode_pages > 0 for p in plans):
        return bool(plans)
    return sum(p.kept_tokens(n_tokens) for p in plans) <= MAX_KV_KEPT * n_tokens * len(plans)


def _prompt_padding(masks, n_tokens: int):
    """The (B, N) real-token mask of a prompt, from the 4D masks generate built for a static cache's full length (one
    per layer type when the model mixes them), so that the model builds the prefill's mask for the budgeted cache:
    a key is real where its own query row attends it (the diagonal: causal and window masks both keep it; padding
    clears it). Anything else is returned as it is."""
    if isinstance(masks, dict):
        masks = next(iter(masks.values()), None)
    if not (isinstance(masks, torch.Tensor) and masks.dim() == 4 and masks.shape[-2] == n_tokens):
        return masks
    diagonal = torch.diagonal(masks[:, 0, :, :n_tokens], dim1=-2, dim2=-1)
    return (diagonal if diagonal.dtype == torch.bool else diagonal == 0).long()


def left_padding(attention_mask) -> tuple[bool, list[int] | None]:
    """Whether the head-budgeted cache takes a forward's ``attention_mask``, and each row's pad tokens on the left of
    it (None: no padding; no mask or one not (B, N) counts as none). It takes a mask whose zeros all come before a
    row's first real token (``generate``'s left padding); right padding or holes it does not. A host read, once per
    new cache."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return True, None
    real = attention_mask.bool()
    if not bool((real[:, 1:] >= real[:, :-1]).all()):
        return False, None
    return True, (~real).sum(1).tolist()


def budget_cache_for(model, kwargs: dict) -> tuple[HeadBudgetCache | None, tuple[str, str] | None]:
    """The head-budgeted cache this forward of a patched model runs with: the one it was given, or a new one in
    place of a fresh cache (written into ``kwargs`` under the keyword the model's forward reads). Returns
    ``(cache, None)``, or ``(None, (kind, message))`` saying why the forward keeps another cache (``None`` reason
    when the recipe keeps the full cache anyway or the forward caches nothing)."""
    name, cache = hf.given_cache(kwargs)
    if isinstance(cache, HeadBudgetCache):
        if cache.get_seq_length() == 0:  # its prefill: tell it the padding
            left, pads = left_padding(kwargs.get("attention_mask"))
            if not left:
                raise UnsupportedBatchError(f"the head-budgeted cache takes left-padded batches only, not {NOT_LEFT}; pad "
                                            "on the left (tokenizer padding_side='left') or pass no HeadBudgetCache")
            cache.set_left_padding(pads)
        return cache, None
    compiled = compiled_for(model.config)
    use_cache = kwargs.get("use_cache")
    use_cache = getattr(model.config, "use_cache", True) if use_cache is None else use_cache
    if compiled is None or not use_cache or not compiled.compresses_kv:
        return None, None
    last = getattr(model, REASON_ATTR, None)
    if cache is not None and last is not None and last[0]() is cache:  # a later step of a generation already told
        return None, last[1]
    if cache is not None and not _fresh(cache):
        return None, ("given", f"the forward was given a {type(cache).__name__} (a cache passed in, or a "
                               "cache_implementation other than 'static'), which patchattn does not replace")
    if cache is not None and cache.get_seq_length() > 0:
        return None, ("filled", f"the forward was given a {type(cache).__name__} that already holds tokens (filled "
                                "without the patch)")
    prompt = _prompt(kwargs)
    chunked = prompt_end() if prompt is not None else None  # generate's prefill_chunk_size
    n_prompt = chunked or (prompt.shape[1] if prompt is not None else 0)
    if prompt is not None and not worth_budgeting(compiled.recipe.kv_plans(), n_prompt):
        return None, ("short", f"on a {n_prompt}-token prompt the KV plans would keep over {MAX_KV_KEPT:.0%} of it, "
                               "so the full cache (faster, no page headroom) is used")
    if type(cache) is StaticCache:  # generate built its masks for the static cache's length
        kwargs["attention_mask"] = _prompt_padding(kwargs.get("attention_mask"), prompt.shape[1])
    left, pads = left_padding(kwargs.get("attention_mask"))
    if not left:
        return None, ("padded", f"{NOT_LEFT}: the head-budgeted KV cache takes left padding only, so the full cache is "
                                "used")
    budget = HeadBudgetCache.from_recipe(compiled.recipe, model.config, reserve_tokens=_decode_tokens(model, n_prompt))
    budget.set_left_padding(pads)
    if chunked is not None and chunked > prompt.shape[1]:
        budget.expect_prompt(chunked)  # the cache compresses after the last chunk, not this one
    kwargs.pop(name, None)
    kwargs[hf.cache_argument(model)] = budget
    return budget, None


def _prompt(kwargs: dict):
    """The forward's input ids, else its input embeddings (None: neither)."""
    return kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")


def _chunked_prompt(kwargs: dict) -> int | None:
    """The whole prompt's length when this forward is one of ``generate``'s prefill chunks. A frame walk, so only for
    forwards that could be one: given a cache (generate's chunks always are) and more than one token."""
    prompt = _prompt(kwargs)
    if prompt is None or prompt.shape[1] <= 1 or hf.given_cache(kwargs)[1] is None:
        return None
    return hf.chunked_prompt_tokens()


def _fresh(cache) -> bool:
    """Whether ``cache`` is one transformers made for this call, which the budgeted cache may replace: the default
    ``DynamicCache``, or the ``StaticCache`` of ``cache_implementation="static"`` (``generate`` builds it before the
    prefill and its layers allocate nothing until their first tokens; the switch also sends the decode steps down
    ``generate``'s compile path, which a patched model replays as CUDA graphs: :mod:`patchattn.decode_graphs`). A
    cache the caller built and passed in (to ``generate`` or to a forward outside it) is theirs to keep."""
    if type(cache) is DynamicCache:
        return True
    return type(cache) is StaticCache and not getattr(cache, "_is_user_defined", False) and hf.in_generate()


def _decode_tokens(model, n_prompt: int) -> int | None:
    """Decode tokens to reserve room for: what the ``generate`` call running this forward may still add after its
    ``n_prompt``-token prompt, within the model's context; None outside ``generate`` (the cache then keeps a little
    headroom and grows on demand)."""
    if not n_prompt:
        return None
    new_tokens = hf.generation_new_tokens(n_prompt)
    context = hf.context_length(model.config)
    if new_tokens is not None and context:
        new_tokens = max(0, min(new_tokens, context - n_prompt))
    return new_tokens


def _bypassed(model, output, chosen: HeadBudgetCache | None, reason):
    """(kind, message) when this forward of a model whose recipe compresses the KV cache ran on another cache."""
    ran_on = hf.output_cache(output)
    if ran_on is None or isinstance(ran_on, HeadBudgetCache):
        return None
    if chosen is not None:  # we gave it one and the model used another: transformers changed how caches travel
        return ("ignored", f"transformers {transformers_version} ran the forward on its own {type(ran_on).__name__}, not "
                           f"the head-budgeted cache patchattn passed as `{hf.cache_argument(model)}`; please report this")
    compiled = compiled_for(model.config)
    if compiled is None or not compiled.compresses_kv:
        return None
    return reason or ("unknown", f"the forward ran on a {type(ran_on).__name__}")


def _say_once(model, reason) -> None:
    kind, message = reason
    warned = getattr(model, WARNED_ATTR, None)
    if warned is None:
        warned = set()
        setattr(model, WARNED_ATTR, warned)
    if kind not in warned:
        warned.add(kind)
        logger.warning("the recipe's KV plans are not in effect (the cache is kept in full): %s", message)


def kv_cache_status(model, cache) -> str | None:
    """What the cache a patched forward or generation ended on means for the recipe's KV plans: ``"budgeted"``,
    ``"full: <reason>"`` when the recipe compresses the KV cache but ``cache`` is another one, or None when the
    recipe keeps the full cache anyway (or there is no recipe, or no cache)."""
    if cache is None:
        return None
    if isinstance(cache, HeadBudgetCache):
        return "budgeted"
    compiled = compiled_for(model.config)
    if compiled is None or not compiled.compresses_kv:
        return None
    last = getattr(model, REASON_ATTR, None)
    reason = last[1] if last is not None and last[0]() is cache else None
    return "full: " + (reason[1] if reason else f"the generation ran on a {type(cache).__name__}")


def install(model) -> None:
    """Hook ``model``'s forward (idempotent): see the module docstring."""
    if getattr(model, HOOKS_ATTR, None):
        return
    tokens: list = []
    chosen: list = []
    swapped: list = []  # per forward: whether it runs the replaced attention implementation (dense_forward)

    def pre(module, args, kwargs):
        if torch.compiler.is_compiling():  # generate's compile path: decode steps on the cache the eager prefill chose
            return args, kwargs
        forget_skipped_mask(_chunked_prompt(kwargs))
        cache, reason = budget_cache_for(module, kwargs)
        tokens.append(_ACTIVE_CACHE.set(cache))
        chosen.append((cache, reason))
        dense = dense_prefill(module, args, kwargs) if cache is None else None
        if dense is not None:  # every layer dense in this prefill: the dense model's own attention path
            module.config._attn_implementation = dense
        swapped.append(dense is not None)
        return args, kwargs

    def post(module, args, kwargs, output):
        if torch.compiler.is_compiling():
            return output
        if swapped and swapped.pop():
            module.config._attn_implementation = ATTN_NAME
        if tokens:
            _ACTIVE_CACHE.reset(tokens.pop())
        cache, reason = chosen.pop() if chosen else (None, None)
        bypass = _bypassed(module, output, cache, reason)
        if bypass is not None:
            setattr(module, REASON_ATTR, (weakref.ref(hf.output_cache(output)), bypass))
            _say_once(module, bypass)
        return output

    handles = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True, always_call=True),
    ]
    setattr(model, HOOKS_ATTR, handles)


def remove(model) -> None:
    for handle in getattr(model, HOOKS_ATTR, None) or []:
        handle.remove()
    for attr in (HOOKS_ATTR, REASON_ATTR, WARNED_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
