"""Every transformers internal patchattn reads, checked against the installed release, so that a release that moves one
fails here by name instead of silently turning patchattn dense or slow. CI runs this file on the newest transformers
the range allows and on the oldest (5.17); the closing note of issue 15 lists what guards what.

What is read, and where:
- the cache keyword of ``forward`` and of model outputs (``hf.cache_argument``, ``hf.output_cache``);
- the attention-function contract: ``AttentionInterface.register``, the call's arguments (``scaling``, ``dropout``,
  ``sliding_window``), ``module.layer_idx`` / ``module.config`` (``patch.patchattn_attention``);
- the mask-builder registry and the keyword arguments transformers passes to a mask builder
  (``sliding_window.mask_for_patchattn`` / ``plain_sliding_prefill``), and ``sdpa_mask`` itself;
- ``sdpa_attention_forward`` (the dense path);
- the cache layer contract: ``Cache(layers=...)``, the abstract methods of a cache layer and the ones
  ``cache.BudgetLayer`` overrides (``DynamicLayer``);
- ``_supports_attention_backend``, ``set_attn_implementation``, ``config._attn_implementation``;
- the config fields of sliding windows (``sliding_window``, ``layer_types``, ``use_sliding_window``);
- GGUF loading (``gguf_file=``, ``quantization_config``): ``test_models.py`` and the real-model tests.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import ARCHS, tiny_model
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

import patchattn
from patchattn import hf
from patchattn.config_keys import RECIPE_KEY
from patchattn.patch import ATTN_NAME, patchattn_attention, register
from patchattn.sliding_window import mask_for_patchattn, plain_sliding_prefill
from patchattn.cache import BudgetLayer, sliding_windows
from patchattn.recipe import Recipe

pytestmark = pytest.mark.internals  # CI runs these on the oldest supported transformers too


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_takes_and_returns_the_cache_under_a_known_keyword(arch):
    model = tiny_model(arch)
    params = inspect.signature(type(model).forward).parameters
    name = hf.cache_argument(model)
    assert name in params, f"{type(model).__name__}.forward takes none of {hf.CACHE_ARGUMENTS}: {list(params)}"
    out = model(torch.randint(0, 256, (1, 20)), use_cache=True)
    assert isinstance(hf.output_cache(out), Cache), f"the output carries its cache under none of {hf.CACHE_ARGUMENTS}: {list(out)}"
    again = model(torch.randint(0, 256, (1, 1)), use_cache=True, **{name: hf.output_cache(out)})
    assert hf.output_cache(again).get_seq_length() == 21


class _AliasingOutput(dict):
    """An output whose own lookups of the old cache name warn, as 5.25's ``ModelOutput`` does."""

    def get(self, key, default=None):
        raise AssertionError(f"read through the output's own get ({key!r}): 5.25 warns that the name is deprecated")

    def __getitem__(self, key):
        raise AssertionError(f"read through the output's own [] ({key!r}): 5.25 warns that the name is deprecated")


@pytest.mark.parametrize("name", hf.CACHE_ARGUMENTS)
def test_reading_an_outputs_cache_never_goes_through_its_deprecated_alias(name):
    cache = object()
    assert hf.output_cache(_AliasingOutput({name: cache, "logits": 1})) is cache
    assert hf.output_cache(_AliasingOutput({"logits": 1})) is None


@pytest.fixture
def recorded_calls(monkeypatch):
    """Every call transformers makes to patchattn's attention function and mask builder, while registered."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    calls = {"attention": [], "mask": []}

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        calls["attention"].append(dict(
            module=module, shapes=(query.shape, key.shape), mask=attention_mask, args=args, kwargs=kwargs,
            config_patched=getattr(module.config, RECIPE_KEY, None) is not None,
        ))
        return patchattn_attention(module, query, key, value, attention_mask, *args, **kwargs)

    def mask(*args, **kwargs):
        calls["mask"].append(dict(args=args, kwargs=kwargs))
        return mask_for_patchattn(*args, **kwargs)

    AttentionInterface.register(ATTN_NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, mask)
    try:
        yield calls
    finally:
        register()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_attention_function_is_called_as_patchattn_expects(arch, recorded_calls):
    model = tiny_model(arch)
    text = hf.text_config(model.config)
    ids = torch.randint(0, 256, (1, 160))
    # a sparse recipe: a prefill dense in every layer runs the replaced implementation, not patchattn's function
    with patchattn.patched(model, Recipe.uniform(model.config, "block_topk", block_size=16, threshold=0.9), backend="torch"):
        out = model(ids, use_cache=True)
        model(ids[:, -1:], use_cache=True, **{hf.cache_argument(model): hf.output_cache(out)})
    windows = sliding_windows(model.config)
    prefill = recorded_calls["attention"][: text.num_hidden_layers]
    decode = recorded_calls["attention"][text.num_hidden_layers :]
    assert len(prefill) == len(decode) == text.num_hidden_layers
    for i, call in enumerate(prefill + decode):
        module, kwargs = call["module"], call["kwargs"]
        assert not call["args"], "transformers now passes positional arguments after the mask"
        assert isinstance(getattr(module, "layer_idx", None), int) and module.layer_idx == i % text.num_hidden_layers
        assert call["config_patched"], "module.config is not the patched model's config"
        assert "scaling" in kwargs and "dropout" in kwargs, f"attention kwargs: {sorted(kwargs)}"
        q_shape, k_shape = call["shapes"]
        assert len(q_shape) == 4 and q_shape[1] == text.num_attention_heads and k_shape[1] == text.num_key_value_heads
        window = windows[module.layer_idx]
        if window is not None:  # the layer names its window, and a plain prefill's mask was left out for it
            assert kwargs.get("sliding_window") == window
            if call in prefill:
                assert call["mask"] is None
    assert all(c["shapes"][0][2] == 160 for c in prefill) and all(c["shapes"][0][2] == 1 for c in decode)


def test_the_mask_builder_gets_the_arguments_it_reads(recorded_calls, monkeypatch):
    """``plain_sliding_prefill`` reads these keyword arguments; were one renamed, a sliding-window prefill would keep
    transformers' full mask (slow) or a chunked one lose it (wrong). The defaults it assumes are sdpa_mask's."""
    from transformers.masking_utils import sdpa_mask

    from patchattn import sliding_window

    monkeypatch.setattr(sliding_window, "WINDOW_KERNEL_MIN_TOKENS", 0)  # a dense prefill this short runs the model's own path
    model = tiny_model("gemma3")
    with patchattn.patched(model, Recipe.uniform(model.config, "dense", block_size=16), backend="torch"):
        model(torch.randint(0, 256, (1, 160)))
    assert recorded_calls["mask"], "transformers no longer asks the registered mask builder"
    for call in recorded_calls["mask"]:
        assert not call["args"], "mask builders are now called with positional arguments"
        assert {"q_length", "kv_length", "config", "attention_mask"} <= set(call["kwargs"]), sorted(call["kwargs"])
    sliding = [c["kwargs"] for c in recorded_calls["mask"] if c["kwargs"].get("local_size")]
    assert sliding and all(k["local_size"] == model.config.sliding_window for k in sliding)
    assert plain_sliding_prefill(sliding[0])
    params = inspect.signature(sdpa_mask).parameters
    for name in ("q_length", "kv_length", "attention_mask", "local_size", "allow_is_causal_skip"):
        assert name in params, f"sdpa_mask no longer takes {name}"
    assert params["q_offset"].default == 0 and params["kv_offset"].default == 0
    assert params["allow_is_causal_skip"].default is True


def test_the_dense_path_and_the_attention_switch_exist():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert callable(sdpa_attention_forward)
    model = tiny_model("llama")
    assert model._supports_attention_backend is True and hf.supports_attention_registry(model)
    model.set_attn_implementation(ATTN_NAME)
    assert model.config._attn_implementation == ATTN_NAME
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


def test_a_forward_run_by_generate_sees_its_new_tokens():
    """generate hands forward no length; :func:`hf.generation_new_tokens` reads it from generate's frame (its per-call
    ``generation_config``), which must still be there: ``max_new_tokens`` at the prefill, None outside generate."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(hf.generation_new_tokens(30)), with_kwargs=True)
    try:
        model.generate(ids, max_new_tokens=7, do_sample=False)
        model(ids)
    finally:
        handle.remove()
    assert seen[0] == 7 and seen[-1] is None


def test_a_chunked_prefill_tells_its_forwards_the_whole_prompt():
    """generate's prefill loop over ``prefill_chunk_size`` chunks keeps them in ``input_chunks``, which
    :func:`hf.chunked_prompt_tokens` reads: the whole prompt in every chunk's forward, None without chunking."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(hf.chunked_prompt_tokens()), with_kwargs=True)
    try:
        model.generate(ids, max_new_tokens=2, do_sample=False, prefill_chunk_size=32)
        model.generate(ids, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    assert seen[:4] == [100] * 4 and seen[-2:] == [None, None]


def test_the_budget_layer_fills_the_cache_layer_contract():
    """Every abstract method of a cache layer is BudgetLayer's own, and every layer method it overrides is still one
    transformers defines (a renamed method would leave the override dead and DynamicLayer's in charge)."""
    abstract = set(CacheLayerMixin.__abstractmethods__)
    own = [cls for cls in BudgetLayer.__mro__ if cls.__module__.startswith("patchattn.")]  # the layer and its pools
    ours_by_name = {name: value for cls in reversed(own) for name, value in vars(cls).items()}
    assert abstract <= set(ours_by_name), f"BudgetLayer lacks {abstract - set(ours_by_name)}"
    overrides = {name for name, value in ours_by_name.items() if callable(value) and not name.startswith("_")}
    contract = {name for name in overrides if hasattr(CacheLayerMixin, name) or hasattr(DynamicLayer, name)}
    ours = {"attend", "decode_step", "finish_prefill", "reserve", "page_lists", "pool_views", "kept_positions", "kv_bytes",
            "dense_kv_bytes", "caps_used", "set_left_padding", "room_for", "advance_host", "expect_prompt", "prefill_attended"}
    assert overrides - contract == ours, f"methods transformers no longer defines: {overrides - contract - ours}"
    for name in ("update", "get_seq_length", "get_mask_sizes", "reorder_cache", "crop", "reset"):
        assert name in contract
    assert list(inspect.signature(DynamicLayer.get_mask_sizes).parameters)[:2] == ["self", "query_length"]
    assert "layers" in inspect.signature(Cache.__init__).parameters
    cache = patchattn.cache.HeadBudgetCache([[patchattn.recipe.KVPlan("full")]])
    assert isinstance(cache, Cache) and cache.get_seq_length() == 0 and cache.get_mask_sizes(torch.arange(3), 0) == (3, 0)
    assert DynamicCache().get_seq_length() == 0


def test_sliding_window_config_fields():
    model = tiny_model("gemma3")
    text = hf.text_config(model.config)
    assert text.layer_types == ["sliding_attention", "full_attention"]
    assert sliding_windows(model.config) == [text.sliding_window, None]
    assert sliding_windows(tiny_model("llama").config) == [None] * tiny_model("llama").config.num_hidden_layers
