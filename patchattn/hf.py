"""The model-config and transformers-internal questions patchattn asks, answered in one place.

patchattn is tested on the transformers range ``pyproject.toml`` states (5.17 to 5.25). Across it the KV cache
travels under two names: up to 5.2x a model's ``forward`` takes ``past_key_values``; 5.25 takes ``cache`` (and
renames a ``past_key_values`` it is given, with a deprecation warning), and ``generate`` passes ``cache``. Every
other module asks here rather than naming either, and asks here for a config's text part, its layer count, its
sliding windows (and the one an attention call names), whether it attends in chunks, its context length, whether a
model routes attention through the registry and how many tokens the running ``generate`` call may add;
``tests/test_hf_internals.py`` fails loudly when a release moves what this module, the mask builder or the cache
layer contract relies on.
"""

from __future__ import annotations

import functools
import inspect
import sys

CACHE_ARGUMENTS = ("cache", "past_key_values")  # the newest name first
GENERATE_MODULE = "transformers.generation.utils"  # where generate and its decoding loops live
MAX_FRAMES = 64  # how far up the stack a forward looks for the generate call running it


@functools.lru_cache(maxsize=None)
def _cache_argument_of(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    return CACHE_ARGUMENTS[-1]  # a model without either (no cache at all): the name older releases read


def cache_argument(model) -> str:
    """The keyword this model's ``forward`` takes its KV cache under (``cache`` or ``past_key_values``)."""
    return _cache_argument_of(type(model))


def given_cache(kwargs: dict) -> tuple[str | None, object]:
    """(keyword, cache) of the cache a forward call was given under either name; (None, None) when none was."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def output_cache(output):
    """The cache a model output or ``generate`` result carries (``cache`` on 5.25, ``past_key_values`` before).
    Outputs are dicts of their set fields: the plain dict's lookup, not the output's own ``get`` or attribute, avoids
    5.25's deprecated alias (which warns on any read of the old name)."""
    if not isinstance(output, dict):
        return None
    return next((dict.get(output, name) for name in CACHE_ARGUMENTS if dict.get(output, name) is not None), None)


def _generate_local(frame, name: str, accept=lambda value: value is not None):
    """The local ``name`` of the nearest frame of generate's module, walking up from ``frame``, that holds one
    ``accept`` takes; None when no frame within :data:`MAX_FRAMES` does."""
    for _ in range(MAX_FRAMES):
        if frame is None:
            return None
        if frame.f_globals.get("__name__") == GENERATE_MODULE:
            value = frame.f_locals.get(name)
            if accept(value):
                return value
        frame = frame.f_back
    return None


def in_generate() -> bool:
    """Whether a ``generate`` call runs the forward asking (its frame holds a ``generation_config``)."""
    return _generate_local(sys._getframe(1), "generation_config") is not None


def generation_new_tokens(prompt_tokens: int) -> int | None:
    """How many tokens the ``generate`` call running this forward may add after its ``prompt_tokens``-token prompt,
    or None when no ``generate`` runs it. transformers hands ``forward`` no length, so this reads the per-call
    ``generation_config`` from generate's own frame (its ``max_length`` is prompt + ``max_new_tokens`` by then); a
    stack without one gives None. Called once per new cache, not per step."""
    max_length = getattr(_generate_local(sys._getframe(1), "generation_config"), "max_length", None)
    return max(0, max_length - prompt_tokens) if isinstance(max_length, int) else None


def chunked_prompt_tokens() -> int | None:
    """The whole prompt's length when the ``generate`` call running this forward prefills it in chunks
    (``prefill_chunk_size``: its prefill loop's ``input_chunks``, in 5.17 and 5.25 alike); None otherwise. Read once
    per new cache, by the first chunk's forward."""
    chunks = _generate_local(sys._getframe(1), "input_chunks", lambda value: isinstance(value, (tuple, list)) and bool(value))
    return sum(int(c.shape[-1]) for c in chunks) if chunks is not None else None


def text_config(config):
    """The text (decoder) part of a model config: multimodal configs nest it, plain ones are it."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(config) -> int:
    """The decoder's layer count."""
    return text_config(config).num_hidden_layers


def sliding_window(config) -> int | None:
    """The model's sliding attention window in tokens, as its config names it (None: none), whichever layers use it."""
    return getattr(text_config(config), "sliding_window", None) or None


def chunked_attention(config) -> bool:
    """Whether the model attends within chunks of its sequence (``attention_chunk_size``, Llama 4)."""
    return bool(getattr(text_config(config), "attention_chunk_size", None))


def call_sliding_window(kwargs: dict) -> int:
    """The sliding window a layer hands its attention function (``sliding_window=``; 0: a full-attention layer)."""
    return int(kwargs.get("sliding_window") or 0)


def sliding_windows(config) -> list[int | None]:
    """Per layer, the model's own sliding attention window (None for full-attention layers)."""
    text = text_config(config)
    n_layers = text.num_hidden_layers
    window = sliding_window(text)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return [None] * n_layers
    types = getattr(text, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n_layers


def context_length(config) -> int | None:
    """The model's context in tokens (``max_position_embeddings``; GPT-2's ``n_positions``)."""
    text = text_config(config)
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def supports_attention_registry(model_or_class) -> bool:
    """Whether a model (or model class) routes attention through transformers' attention-function registry, the one
    hook patchattn uses (``_supports_attention_backend``)."""
    return bool(getattr(model_or_class, "_supports_attention_backend", False))
