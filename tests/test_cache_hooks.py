"""How a patched model's forwards get the head-budgeted cache, on whichever transformers is installed, and what is said
when they do not. CI runs this file on the newest transformers the range allows and on the oldest (5.17)."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from conftest import tiny_model
from transformers.cache_utils import DynamicCache

import patchattn
from patchattn import cache_hooks, hf
from patchattn.cache import HeadBudgetCache
from patchattn.errors import UnsupportedBatchError
from patchattn.eval.tables import NOT_BUDGETED, fmt_kv
from patchattn.recipe import KVPlan, Recipe

pytestmark = pytest.mark.internals  # CI runs these on the oldest supported transformers too

WARNING = "the recipe's KV plans are not in effect"


def streaming_recipe(model):
    """Every KV head on sink 16 + window 64: a 300-token prompt keeps under a third of its cache."""
    recipe = Recipe.uniform(model.config, "streaming", sink_tokens=16, window_tokens=64)
    assert recipe.compresses_kv
    return recipe


def prompt(n=300, batch=1, seed=1):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def dense_bytes(model, ids, new_tokens):
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
    cache = hf.output_cache(out)
    assert type(cache) is DynamicCache
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_a_kv_compressing_recipe_keeps_fewer_bytes_than_dense(arch, caplog):
    """The installed transformers' generate (``cache=`` on 5.25, ``past_key_values=`` on 5.17) runs on the budgeted
    cache, with no warning."""
    model = tiny_model(arch)
    ids = prompt()
    dense = dense_bytes(model, ids, 20)
    with caplog.at_level(logging.WARNING), patchattn.patched(model, streaming_recipe(model), backend="torch"):
        out = model.generate(ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
        cache = hf.output_cache(out)
        assert cache_hooks.kv_cache_status(model, cache) == "budgeted"
    assert isinstance(cache, HeadBudgetCache) and cache.get_seq_length() == 319
    assert 0 < cache.kv_bytes() < 0.5 * dense
    assert WARNING not in caplog.text


def test_generate_sizes_the_pools_for_its_new_tokens_once():
    """generate's own ``max_new_tokens`` reaches the cache (read from generate's frame: transformers hands forward no
    length): a growing head gets room for exactly that many tokens, page-rounded, and never regrows; a plain forward,
    outside generate, keeps the default headroom."""
    model = tiny_model("llama")
    ids = prompt(140)
    recipe = Recipe.uniform(model.config, "dense")
    recipe.kv_layers = [[KVPlan("full", decode_pages=4), KVPlan("window", sink_tokens=4, window_tokens=32)] for _ in recipe.layers]
    with patchattn.patched(model, recipe, backend="torch"):
        for new_tokens, cap in ((40, 192), (80, 224)):  # 140 + new tokens, rounded up to 16-token pages
            cache = hf.output_cache(model.generate(ids, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True))
            assert [(layer.reserve_tokens, layer.caps) for layer in cache.layers] == [(new_tokens, [cap, 48])] * 2
            assert cache.get_seq_length() == 140 + new_tokens - 1
        cache = hf.output_cache(model(ids, use_cache=True))
    assert [(layer.reserve_tokens, layer.caps) for layer in cache.layers] == [(None, [208, 48])] * 2  # 140 + 64 headroom


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # 5.25 deprecates the old name, still reads it
@pytest.mark.parametrize("keyword", hf.CACHE_ARGUMENTS)
def test_plain_forwards_get_the_budgeted_cache_under_either_keyword(keyword):
    """A forward with ``use_cache=True`` and no cache, or an empty ``DynamicCache`` under either name the range has
    used, gets the budgeted cache; the next forward with that cache decodes through it."""
    model = tiny_model("llama")
    if keyword not in (hf.cache_argument(model), "past_key_values"):  # 5.25 reads both, older releases the old one
        pytest.skip(f"transformers {transformers.__version__} does not read `{keyword}`")
    ids = prompt()
    with patchattn.patched(model, streaming_recipe(model), backend="torch"):
        first = model(ids, use_cache=True)
        assert isinstance(hf.output_cache(first), HeadBudgetCache)
        out = model(ids, use_cache=True, **{keyword: DynamicCache()})
        cache = hf.output_cache(out)
        assert isinstance(cache, HeadBudgetCache)
        step = model(ids[:, -1:], use_cache=True, **{keyword: cache})
        assert hf.output_cache(step) is cache and cache.get_seq_length() == 301


def test_a_left_padded_batch_generates_for_each_row_what_it_generates_alone(caplog):
    """generate's left padding reaches the budgeted cache (the pre-hook reads it off ``attention_mask``): 3 rows of
    300, 230 and 150 tokens under window and SnapKV heads each generate, greedily, the tokens the row generates alone,
    unpadded, on the budgeted cache too -- tokens the dense model does not generate, so the plans are in effect."""
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "dense")
    plans = [KVPlan("window", sink_tokens=4, window_tokens=40), KVPlan("snapkv", budget_tokens=64, window_tokens=8)]
    recipe.kv_layers = [plans for _ in recipe.layers]
    rows = [prompt(n, seed=n)[0] for n in (300, 230, 150)]
    ids = torch.zeros(3, 300, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, 300 - len(row) :], mask[b, 300 - len(row) :] = row, 1
    generate = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    dense = model.generate(ids, attention_mask=mask, **generate).sequences[:, 300:]
    with caplog.at_level(logging.WARNING), patchattn.patched(model, recipe, backend="torch"):
        out = model.generate(ids, attention_mask=mask, **generate)
        assert cache_hooks.kv_cache_status(model, hf.output_cache(out)) == "budgeted"
        for b, row in enumerate(rows):
            alone = model.generate(row[None], **generate)
            assert cache_hooks.kv_cache_status(model, hf.output_cache(alone)) == "budgeted"
            assert out.sequences[b, 300:].tolist() == alone.sequences[0, len(row) :].tolist(), b
    assert not torch.equal(out.sequences[:, 300:], dense)
    assert WARNING not in caplog.text
    layer = hf.output_cache(out).layers[0]
    assert layer.valid_t.tolist() == [[44, 73], [44, 73], [44, 73]]  # sinks + window; SnapKV's 64 + 9 generated
    sinks = [layer.kept_positions(0)[b, :4].tolist() for b in range(3)]
    assert sinks == [[0, 1, 2, 3], [70, 71, 72, 73], [150, 151, 152, 153]]  # each row's first real tokens


def test_a_batch_padded_on_the_right_runs_on_the_full_cache_and_says_so_once(caplog):
    model = tiny_model("llama")
    ids = prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with caplog.at_level(logging.WARNING), patchattn.patched(model, streaming_recipe(model), backend="torch"):
        for _ in range(2):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        cache = hf.output_cache(out)
        status = cache_hooks.kv_cache_status(model, cache)
        with pytest.raises(UnsupportedBatchError, match="left-padded batches only"):  # a budgeted cache passed in
            model(ids, attention_mask=mask, use_cache=True, **{hf.cache_argument(model): HeadBudgetCache.from_recipe(
                streaming_recipe(model), model.config)})
    assert not isinstance(cache, HeadBudgetCache)
    assert status.startswith("full: a batch padded other than on the left")
    said = [r for r in caplog.records if WARNING in r.getMessage()]
    assert len(said) == 1 and "padded other than on the left" in said[0].getMessage()  # once per model and reason


def test_a_cache_the_model_ignores_is_said(monkeypatch, caplog):
    """If a transformers release stops reading the keyword patchattn passes its cache under (as 5.25 did with
    ``past_key_values`` before this module), the forward runs on transformers' own cache: that is said, naming it."""
    model = tiny_model("llama")
    monkeypatch.setattr(hf, "cache_argument", lambda model: "a_keyword_no_release_reads")
    with caplog.at_level(logging.WARNING), patchattn.patched(model, streaming_recipe(model), backend="torch"):
        out = model(prompt(), use_cache=True)
        status = cache_hooks.kv_cache_status(model, hf.output_cache(out))
    assert type(hf.output_cache(out)) is DynamicCache
    assert status.startswith("full: transformers") and "please report" in status
    assert WARNING in caplog.text and "a_keyword_no_release_reads" in caplog.text


def test_a_filled_or_foreign_cache_is_kept_and_said(caplog):
    model = tiny_model("llama")
    ids = prompt()
    filled = hf.output_cache(model(ids, use_cache=True))  # unpatched: transformers' own cache, holding the prompt
    with caplog.at_level(logging.WARNING), patchattn.patched(model, streaming_recipe(model), backend="torch"):
        out = model(ids[:, -1:], use_cache=True, **{hf.cache_argument(model): filled})
        assert hf.output_cache(out) is filled
        assert cache_hooks.kv_cache_status(model, filled).startswith("full: the forward was given a DynamicCache that already holds")
    assert "already holds tokens" in caplog.text


def test_recipes_that_keep_every_token_say_nothing(caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING), patchattn.patched(model, Recipe.uniform(model.config, "dense"), backend="torch"):
        out = model.generate(prompt(), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert cache_hooks.kv_cache_status(model, hf.output_cache(out)) is None
    assert WARNING not in caplog.text


def test_report_marks_kv_figures_that_are_not_the_recipes():
    rows = [{"kv_bytes": 2**20, "kv_cache": "budgeted"}, {"kv_bytes": 2**20, "kv_cache": "full: a padded batch"}]
    assert fmt_kv(rows[:1]) == "1.0 MiB"
    assert fmt_kv(rows).endswith(NOT_BUDGETED) and fmt_kv(rows).startswith("1.0 MiB")


@pytest.mark.parametrize("kv", ["window", "snapkv"])
def test_generate_prefilling_in_chunks_keeps_what_the_whole_prompt_would(kv):
    """``prefill_chunk_size``: each chunk's keys wait with the others' and every head chooses what it keeps once the
    last chunk has been attended, over the whole prompt (SnapKV votes from the prompt's last queries), so the cache
    holds the same tokens and generates the same as an unchunked prefill; the pools are sized for the whole prompt."""
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "dense")
    plan = (KVPlan("window", sink_tokens=4, window_tokens=48) if kv == "window"
            else KVPlan("snapkv", budget_tokens=64, window_tokens=16))
    recipe.kv_layers = [[plan, KVPlan("window", sink_tokens=8, window_tokens=32)] for _ in recipe.layers]
    ids = prompt(300)
    greedy = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with patchattn.patched(model, recipe, backend="torch"):
        whole = model.generate(ids, **greedy)
        chunked = model.generate(ids, prefill_chunk_size=64, **greedy)
    a, b = hf.output_cache(whole), hf.output_cache(chunked)
    assert isinstance(b, HeadBudgetCache) and b.get_seq_length() == 311
    for la, lb in zip(a.layers, b.layers):
        assert la.caps == lb.caps and la.reserve_tokens == lb.reserve_tokens == 12
        for h in range(len(la.plans)):
            assert torch.equal(la.kept_positions(h), lb.kept_positions(h))
    assert torch.equal(whole.sequences, chunked.sequences)
    torch.testing.assert_close(torch.stack(whole.scores), torch.stack(chunked.scores), rtol=1e-4, atol=1e-4)


def test_the_kv_plans_are_not_derived_again_by_every_forward(monkeypatch):
    """A forward's cache hook asks whether the recipe compresses the cache; the answer is derived with the compiled
    recipe, not per forward: on a 1B-shaped recipe deriving it cost more host time than a layer's dense attention
    (issue 19, ``benchmarks/RESULTS.md`` 2026-12-07)."""
    from patchattn.recipe import core

    model = tiny_model("llama")
    recipe = streaming_recipe(model)
    recipe.name = "derived-once"  # a recipe no other test compiled
    calls = []
    real = core.derive_kv_plans
    monkeypatch.setattr(core, "derive_kv_plans", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad(), patchattn.patched(model, recipe, backend="torch"):
        after_patch = len(calls)
        for _ in range(3):
            model(prompt(n=40), use_cache=False)
        assert len(calls) == after_patch, f"{len(calls) - after_patch} derivations in 3 forwards without a cache"
        model(prompt(n=40), use_cache=True)
        assert len(calls) <= after_patch + 1, "more than the new cache's own derivation"
