"""A prompt prefilled in chunks (patchattn.chunked): the mask builder leaves an unpadded chunk's mask out, dense layers
attend causally by position, and a sparse layer's layout for a chunk is the rows of the square layout its query
blocks are, so the last chunk attends exactly as the unchunked prefill's last rows do."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import patchattn
from patchattn.chunked import chunk_attention, chunk_layout
from patchattn.compiled import CompiledRecipe
from patchattn.layout import finalize
from patchattn.prefill import layer_layout, sparse_attention
from patchattn.recipe import HeadPlan, Recipe
from patchattn.stats import record_sparsity

pytestmark = pytest.mark.internals  # the mask builder's keywords (q_length, q_offset, kv_length) and generate's chunk loop

MIXED = [
    HeadPlan("streaming", {"sink_tokens": 32, "window_tokens": 64}),
    HeadPlan("block_topk", {"threshold": 0.7}),
    HeadPlan("vertical_slash", {"vertical_tokens": 64, "slash_tokens": 64}),
    HeadPlan("dense", {}),
]


def mixed_recipe(model) -> Recipe:
    recipe = Recipe.uniform(model.config, "dense", block_size=32)
    recipe.layers = [list(MIXED) for _ in recipe.layers]
    return recipe


def qkv(n=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, n, 16, generator=g) * 3
    k = torch.randn(1, 2, n, 16, generator=g) * 3
    return q, k, torch.randn(1, 2, n, 16, generator=g)


def test_the_last_chunks_layout_and_attention_are_the_unchunked_prefills_last_rows():
    model = tiny_model("llama")
    plan = CompiledRecipe(mixed_recipe(model)).layers[0]
    q, k, v = qkv()
    square = finalize(layer_layout(plan, q, k, 32, finished=False))
    for start in (64, 160, 256):  # block-aligned chunks ending at the prompt's end
        chunk = chunk_layout(layer_layout(plan, q[:, :, start:], k, 32, finished=False), None, 320, 32, 0)
        assert torch.equal(chunk, square[..., start // 32 :, :])
    compiled = CompiledRecipe(mixed_recipe(model))
    whole = sparse_attention(plan, q, k, v, 32, None, "torch")
    part = chunk_attention(compiled, q[:, :, 160:], k, v, None, 0.0, 0, "torch", {})
    torch.testing.assert_close(part.transpose(1, 2), whole[:, :, 160:], rtol=1e-5, atol=1e-5)


def test_an_earlier_chunks_rows_are_the_square_ones_and_only_the_prompts_last_block_reads_everything():
    model = tiny_model("llama")
    plan = CompiledRecipe(mixed_recipe(model)).layers[0]
    q, k, _ = qkv()
    keys = k[:, :, :192]  # the chunk [96, 192) against the 192 keys so far, of a 320-token prompt
    whole = finalize(layer_layout(plan, q, k, 32, finished=False))  # the unchunked prefill's layout
    square = finalize(layer_layout(plan, q[:, :, :192], keys, 32, finished=False))
    earlier = layer_layout(plan, q[:, :, 96:192], keys, 32, finished=False)
    chunk = chunk_layout(earlier, None, 192, 32, 0, ends_prompt=False)
    streaming, dense = slice(0, 1), slice(3, 4)
    assert torch.equal(chunk[:, streaming], whole[:, streaming, 3:6, :6])  # position-only layouts: the prompt's rows
    assert torch.equal(chunk[:, dense], whole[:, dense, 3:6, :6])
    assert not bool(chunk[:, streaming, -1, :].all())  # its last block is an ordinary row of the prompt
    last = chunk_layout(earlier, None, 192, 32, 0)  # a chunk that ends the prompt (or whose end nobody said)
    assert torch.equal(last[:, streaming], square[:, streaming, 3:])
    assert bool(last[..., -1, :].all())  # its last block reads every key block


def test_generate_tells_each_chunk_whether_it_ends_the_prompt(monkeypatch):
    from patchattn import chunked

    seen = []
    real = chunked.chunk_layout
    monkeypatch.setattr(chunked, "chunk_layout", lambda *a, **kw: seen.append((a[2], kw["ends_prompt"])) or real(*a, **kw))
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 320), generator=torch.Generator().manual_seed(3))
    with patchattn.patched(model, mixed_recipe(model), backend="torch"):
        model.generate(ids, prefill_chunk_size=64, max_new_tokens=2, do_sample=False)
    assert sorted(set(seen)) == [(128, False), (192, False), (256, False), (320, True)]  # keys so far, per chunk


@pytest.mark.parametrize("recipe_kind", ["dense", "mixed"])
def test_generate_prefilling_in_chunks_skips_the_mask_and_matches_where_it_must(recipe_kind):
    """A dense recipe's chunked prefill gives the unchunked logits (the same causal attention without transformers'
    mask); a sparse one runs each chunk's layout through the kernels (recorded per chunk) and generates."""
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "dense", block_size=32) if recipe_kind == "dense" else mixed_recipe(model)
    ids = torch.randint(0, 256, (1, 320), generator=torch.Generator().manual_seed(3))
    greedy = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with patchattn.patched(model, recipe, backend="torch"):
        whole = model.generate(ids, **greedy)
        with record_sparsity() as rec:
            chunked = model.generate(ids, prefill_chunk_size=64, **greedy)
    if recipe_kind == "dense":
        torch.testing.assert_close(torch.stack(chunked.scores), torch.stack(whole.scores), rtol=1e-4, atol=1e-4)
        assert torch.equal(chunked.sequences, whole.sequences)
    else:
        assert rec.kernels.get("torch", 0) == 2 * 5  # two layers, five chunks (the first one a square prefill)
        assert chunked.sequences.shape == whole.sequences.shape


def test_a_left_padded_batch_prefilled_in_chunks_generates_what_it_generates_unchunked():
    """Padding keeps transformers' mask on every chunk (dense attention under it); the budgeted cache takes each row's
    padding from the first chunk and chooses what each head keeps after the last, as unchunked."""
    from patchattn.recipe import KVPlan

    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "dense", block_size=32)
    recipe.kv_layers = [[KVPlan("window", sink_tokens=4, window_tokens=48), KVPlan("snapkv", budget_tokens=64, window_tokens=16)]
                        for _ in recipe.layers]
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    greedy = dict(max_new_tokens=8, do_sample=False, attention_mask=mask)
    with patchattn.patched(model, recipe, backend="torch"):
        whole = model.generate(ids, **greedy)
        chunked = model.generate(ids, prefill_chunk_size=64, **greedy)
    assert torch.equal(chunked, whole)


def test_a_static_caches_prefill_is_not_taken_for_a_chunk():
    """A prefill into transformers' StaticCache also has fewer queries than keys (the cache's whole length) and, from
    transformers' own builder, no mask (its top-left causal SDPA is right there): only a chunk whose mask patchattn's
    builder left out runs as a chunk, so a patched model that keeps the static cache computes what the unpatched does."""
    from transformers import StaticCache

    from patchattn import hf

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(1))

    def two_steps():
        cache = StaticCache(config=model.config, max_cache_len=62)
        first = model(ids, use_cache=True, **{hf.cache_argument(model): cache}).logits
        step = model(first[:, -1:].argmax(-1), position_ids=torch.tensor([[50]]), use_cache=True,
                     **{hf.cache_argument(model): cache}).logits
        return first, step

    with torch.no_grad():
        plain = two_steps()
        with patchattn.patched(model, Recipe.uniform(model.config, "dense"), backend="torch"):
            patched = two_steps()
    torch.testing.assert_close(patched, plain, rtol=1e-5, atol=1e-5)
