"""The patch on tiny random models of every supported architecture."""

import pytest
import torch
from conftest import ARCHS, tiny_model

import patchattn
from patchattn.compiled import compiled_for
from patchattn.patch import ATTN_NAME, is_patched
from patchattn.recipe import HeadPlan, Recipe
from patchattn.stats import record_sparsity

pytestmark = pytest.mark.internals  # CI runs these on the oldest supported transformers too


def _ids(n=300, batch=2, seed=0):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_recipe_gives_same_logits(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        with patchattn.patched(model, Recipe.uniform(model.config, "dense", block_size=32)):
            assert model.config._attn_implementation == ATTN_NAME
            out = model(ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa" and not is_patched(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_path_with_full_budget_matches_dense(arch):
    """Mixed layers (dense heads next to streaming heads whose window covers everything) go through the
    block-sparse path and must reproduce dense logits, GQA and the model's own masks included."""
    model = tiny_model(arch)
    recipe = Recipe.uniform(model.config, "dense", block_size=32)
    for layer in recipe.layers:
        for h in range(0, len(layer), 2):
            layer[h] = HeadPlan("streaming", {"sink_tokens": 32, "window_tokens": 4096})
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        with patchattn.patched(model, recipe), record_sparsity() as rec:
            out = model(ids).logits
    assert rec.calls == model.config.num_hidden_layers
    assert rec.sparsity == pytest.approx(0.0)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparse_recipe_changes_output_and_reports_sparsity(arch):
    model = tiny_model(arch)
    recipe = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=32)
    ids = _ids(n=512, batch=1)
    with torch.no_grad():
        ref = model(ids).logits
        with patchattn.patched(model, recipe), record_sparsity() as rec:
            out = model(ids).logits
    # 16 blocks: each row keeps the sink, the previous block and the diagonal; the last row reads all 16.
    assert rec.sparsity == pytest.approx(1 - (1 + 2 + 3 * 13 + 16) / 136, abs=1e-6)
    assert (out - ref).abs().max() > 1e-3
    # The first blocks see everything they would see dense, so their logits agree.
    torch.testing.assert_close(out[:, :96], ref[:, :96], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize(
    "strategy,params",
    [("dense", {}), ("streaming", {"sink_tokens": 32, "window_tokens": 64}), ("block_topk", {"threshold": 0.9}),
     ("vertical_slash_tokens", {"vertical_tokens": 64, "slash_tokens": 64}),
     ("vertical_slash_adaptive", {"vertical_tokens": 64, "slash_tokens": 64, "mass": 0.9})],
)
def test_model_window_applied_by_size_equals_the_models_mask(strategy, params, monkeypatch):
    """Gemma 3's sliding layer: patchattn drops transformers' window mask and applies the window itself (so the
    kernels compute only the blocks it reaches); the logits equal those with the window given as a mask, and with a
    dense recipe those of the unpatched model. Sparsity is counted against the window's blocks."""
    import sys

    window_mod = sys.modules["patchattn.sliding_window"]
    monkeypatch.setattr(window_mod, "WINDOW_KERNEL_MIN_TOKENS", 0)  # a dense recipe too takes patchattn's windowed path
    model = tiny_model("gemma3")
    recipe = Recipe.uniform(model.config, strategy, block_size=32, **params)
    ids = _ids(n=400, batch=2)
    with torch.no_grad():
        ref = model(ids).logits
        with patchattn.patched(model, recipe, backend="torch"), record_sparsity() as by_size:
            out = model(ids).logits
        monkeypatch.setattr(window_mod, "plain_sliding_prefill", lambda kwargs: False)
        with patchattn.patched(model, recipe, backend="torch"), record_sparsity() as as_mask:
            masked = model(ids).logits
    torch.testing.assert_close(out, masked, atol=2e-5, rtol=2e-5)
    n_blk, reach = 13, 3  # 400 tokens in blocks of 32; a 48-token window reaches 3 blocks back (diagonal included)
    band = sum(min(i + 1, reach) for i in range(n_blk)) * 2 * 4
    assert by_size.per_layer[0][1] == band and as_mask.per_layer[0][1] == n_blk * (n_blk + 1) / 2 * 2 * 4
    if strategy == "dense":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert by_size.per_layer[0][0] == band


def test_model_window_with_padding_and_decode_keeps_the_models_mask():
    """Padded rows and decode steps get transformers' mask as before: the dense recipe reproduces the model."""
    model = tiny_model("gemma3")
    ids = _ids(n=200, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        plain = model.generate(ids[1:], max_new_tokens=6, do_sample=False)
        with patchattn.patched(model, Recipe.uniform(model.config, "dense", block_size=32)):
            out = model(ids, attention_mask=mask).logits
            gen = model.generate(ids[1:], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 37:], ref[0, 37:], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, plain)


def test_mask_builder_leaves_out_only_a_plain_sliding_prefill():
    from transformers.masking_utils import sdpa_mask

    from patchattn.sliding_window import mask_for_patchattn

    config = tiny_model("gemma3").config
    base = dict(batch_size=1, q_length=100, kv_length=100, q_offset=0, kv_offset=0, local_size=48, config=config)
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

    base["mask_function"] = and_masks(sliding_window_overlay(48), causal_mask_function)
    assert mask_for_patchattn(**base) is None
    padded = torch.ones(1, 100, dtype=torch.bool)
    padded[0, :5] = False
    for change in (dict(attention_mask=padded), dict(q_length=1, q_offset=99), dict(allow_is_causal_skip=False), dict(local_size=64)):
        out = mask_for_patchattn(**(base | change))
        assert isinstance(out, torch.Tensor), change
        assert torch.equal(out, sdpa_mask(**(base | change)))
    assert mask_for_patchattn(**(base | dict(local_size=None, mask_function=causal_mask_function))) is None  # full layer: causal skip


def test_generate_prefill_sparse_decode_dense():
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    ids = _ids(n=256, batch=1)
    with torch.no_grad(), patchattn.patched(model, recipe):
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 264)


def test_patch_rejects_recipe_for_other_model():
    from patchattn.errors import RecipeError

    recipe = Recipe.uniform(tiny_model("llama").config, "dense")
    with pytest.raises(RecipeError, match="another model"):
        patchattn.patch(tiny_model("gpt2"), recipe)


def test_unpatch_restores_original():
    model = tiny_model("qwen2")
    ids = _ids(n=200, batch=1)
    with torch.no_grad():
        ref = model(ids).logits
        patchattn.patch(model, Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=32))
        assert is_patched(model)
        patchattn.unpatch(model)
        out = model(ids).logits
    assert model.config._attn_implementation == "sdpa" and not is_patched(model)
    assert torch.equal(out, ref)


def test_a_recipe_is_compiled_once_and_found_by_the_attention_function(monkeypatch):
    """Patching the same recipe again (the same object or an equal one) reuses its one CompiledRecipe, and the
    attention function finds it without building another; a different recipe gets its own. The config holds only the
    recipe's data, so it serialises as before."""
    from collections import OrderedDict

    from patchattn import compiled as compiled_mod

    monkeypatch.setattr(compiled_mod, "_BY_CONTENT", OrderedDict())  # nothing compiled by earlier tests
    monkeypatch.setattr(compiled_mod, "_BY_DATA", OrderedDict())
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    built = []
    real_init = compiled_mod.CompiledRecipe.__init__
    monkeypatch.setattr(compiled_mod.CompiledRecipe, "__init__", lambda self, *a, **kw: built.append(1) or real_init(self, *a, **kw))
    with torch.no_grad():
        patchattn.patch(model, recipe)
        first = compiled_mod.compiled_for(model.config)
        model(_ids(n=200, batch=1))
        patchattn.unpatch(model)
        with patchattn.patched(model, Recipe.from_dict(recipe.to_dict())):
            assert compiled_mod.compiled_for(model.config) is first
            model(_ids(n=200, batch=1))
            assert model.config.to_dict()["patchattn_recipe"] == recipe.to_dict()
        other = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=96)
        with patchattn.patched(model, other):
            assert compiled_mod.compiled_for(model.config) is not first
            model(_ids(n=200, batch=1))
    assert len(built) == 2  # the first recipe and the other one, each once


@pytest.mark.parametrize(
    "strategy,params",
    [
        ("streaming", {"sink_tokens": 32, "window_tokens": 4096}),
        # every key as a token column (plus the diagonal blocks): the mask must hold on the columns as on the blocks
        ("vertical_slash_tokens", {"vertical_tokens": 4096, "slash_tokens": 32}),
    ],
)
def test_padded_batch_matches_dense(strategy, params):
    """Left padding arrives as the model's own mask and is honoured on the sparse path; a budget covering every key
    gives dense logits, padded or not."""
    model = tiny_model("llama")
    ids = _ids(n=200, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    recipe = Recipe.uniform(model.config, strategy, block_size=32, **params)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with patchattn.patched(model, recipe):
            out = model(ids, attention_mask=mask).logits
            unpadded = model(ids[1:]).logits
    torch.testing.assert_close(out[0, 37:], ref[0, 37:], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out[1], ref[1], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(unpadded[0], ref[1], atol=2e-4, rtol=2e-4)


def test_layer_of_mixed_strategies_and_budgets_equals_each_head_alone():
    """A layer mixing strategy classes and per-head budgets builds one estimate per class; the finalized layout
    equals every head's own strategy run on that head (GQA keys indexed per head)."""
    from patchattn.patch import CompiledRecipe, layer_layout

    model = tiny_model("llama")
    cfg = model.config
    recipe = Recipe.uniform(cfg, "dense", block_size=32)
    plans = [
        HeadPlan("streaming", {"sink_tokens": 32, "window_tokens": 64}),
        HeadPlan("vertical_slash", {"vertical_tokens": 64, "slash_tokens": 96}),
        HeadPlan("block_topk", {"threshold": 0.5}),
        HeadPlan("vertical_slash", {"vertical_tokens": 32, "slash_tokens": 32}),
        HeadPlan("dense"),
        HeadPlan("streaming", {"sink_tokens": 0, "window_tokens": 128}),
        HeadPlan("block_topk", {"threshold": 0.9}),
    ]
    heads, kv_heads = 8, 2  # the compiled plan only reads the recipe's heads; the tiny model has fewer
    recipe.layers[0] = [plans[h % len(plans)] for h in range(heads)]
    compiled = CompiledRecipe(recipe)
    assert len(compiled.layers[0].groups) == len({p.strategy for p in recipe.layers[0]})
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, heads, 300, 16, generator=g)
    k = torch.randn(1, kv_heads, 300, 16, generator=g)
    keep = layer_layout(compiled.layers[0], q, k, 32)
    for h, plan in enumerate(recipe.layers[0]):
        kv = h // (heads // kv_heads)
        alone = plan.build().block_layout(q[:, h : h + 1], k[:, kv : kv + 1], 32)
        assert torch.equal(keep[:, h : h + 1], alone), f"head {h}: {plan}"


def test_prompts_below_min_sparse_tokens_prefill_densely():
    """A recipe's min_sparse_tokens: shorter prompts run dense attention (same logits, nothing skipped), longer ones
    the sparse layouts; the field survives a save and load and is validated."""
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=32)
    recipe.min_sparse_tokens = 400
    assert Recipe.from_dict(recipe.to_dict()).min_sparse_tokens == 400
    assert "min_sparse_tokens" not in Recipe.uniform(model.config).to_dict()  # unset: recipes stay as they were
    with torch.no_grad():
        short, long = _ids(n=300, batch=1), _ids(n=512, batch=1)
        ref_short, ref_long = model(short).logits, model(long).logits
        with patchattn.patched(model, recipe), record_sparsity() as rec:
            out_short = model(short).logits
            assert rec.sparsity == pytest.approx(0.0)
            assert rec.kernels == {"sdpa": model.config.num_hidden_layers}  # which implementation ran each prefill
        with patchattn.patched(model, recipe), record_sparsity() as rec:
            out_long = model(long).logits
            assert rec.sparsity > 0.5
            assert rec.kernels == {"torch": model.config.num_hidden_layers}  # the reference: this is a CPU
    torch.testing.assert_close(out_short, ref_short, atol=1e-5, rtol=1e-5)
    assert (out_long - ref_long).abs().max() > 1e-3
    from patchattn.errors import RecipeError

    with pytest.raises(RecipeError, match="min_sparse_tokens"):
        Recipe.from_dict({**recipe.to_dict(), "min_sparse_tokens": -1})


@pytest.mark.internals  # transformers reads config._attn_implementation at every attention call
@pytest.mark.parametrize("below", ["min_sparse_tokens", "layer_min_tokens"])
def test_a_prefill_dense_in_every_layer_runs_the_models_own_attention(below, monkeypatch, caplog):
    """Below the recipe's break-even the forward runs the attention implementation the patch replaced (the dense
    model's own path, no per-layer detour through patchattn's function), says so once, reports the dense prefill to a
    sparsity record, and is patched again after; above it, or under a layer's break-even with backend "sparse", every
    layer goes through patchattn's function."""
    import logging
    import sys

    patch_module = sys.modules["patchattn.patch"]  # the module (patchattn.patch is also the function's name)

    model = tiny_model("llama")
    n_layers = model.config.num_hidden_layers
    recipe = Recipe.uniform(model.config, "block_topk", block_size=32, threshold=0.5)  # keeps the full KV cache
    if below == "min_sparse_tokens":
        recipe.min_sparse_tokens = 400
    else:
        recipe.layer_min_tokens = [400] * n_layers
    calls = []
    original = patch_module.prefill_attention
    monkeypatch.setattr(patch_module, "prefill_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    short, long = _ids(n=300, batch=1), _ids(n=512, batch=1)
    with torch.no_grad():
        ref = model(short).logits
        with patchattn.patched(model, recipe, backend="auto"), record_sparsity() as rec, \
                caplog.at_level(logging.INFO, logger="patchattn"):
            out = model(short).logits
            assert calls == [] and model.config._attn_implementation == ATTN_NAME
            assert rec.sparsity == pytest.approx(0.0) and rec.kernels == {"sdpa": n_layers}
            model(short)
            said = [r for r in caplog.records if "300-token prompt" in r.getMessage()]
            assert len(said) == 1
            model(long)
            assert len(calls) == n_layers
            generated = model.generate(short, max_new_tokens=3, do_sample=False)
        with patchattn.patched(model, recipe, backend="sparse"):  # min_sparse_tokens holds; the break-even does not
            calls.clear()
            model(short)
            assert len(calls) == (0 if below == "min_sparse_tokens" else n_layers)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(generated, model.generate(short, max_new_tokens=3, do_sample=False))
    assert model.config._attn_implementation != ATTN_NAME


@pytest.mark.internals  # transformers reads config._attn_implementation at every attention call
def test_a_dense_prefill_of_a_sliding_window_model_runs_its_own_attention_below_the_window_kernels_length(monkeypatch):
    """A model with its own sliding windows (Gemma 3's first layer) prefilling densely in every layer runs its own
    attention below WINDOW_KERNEL_MIN_TOKENS (there the windowed kernel's launches cost more than the window saves),
    and patchattn's windowed path from it; the logits equal the unpatched model's either way."""
    import sys

    from patchattn import sliding_window

    patch_module = sys.modules["patchattn.patch"]
    model = tiny_model("gemma3")
    n_layers = model.config.num_hidden_layers
    recipe = Recipe.uniform(model.config, "block_topk", block_size=32, threshold=0.5)
    recipe.layer_min_tokens = [1000] * n_layers  # every layer under its break-even at 300 tokens
    calls = []
    original = patch_module.prefill_attention
    monkeypatch.setattr(patch_module, "prefill_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = _ids(n=300, batch=1)
    with torch.no_grad():
        ref = model(ids).logits
        with patchattn.patched(model, recipe, backend="auto"), record_sparsity() as rec:
            own = model(ids).logits
            assert calls == [] and rec.kernels == {"sdpa": n_layers}
            n_blk, reach = 10, 3  # 300 tokens in blocks of 32; the 48-token window reaches 3 blocks back
            assert rec.per_layer[0][1] == sum(min(i + 1, reach) for i in range(n_blk)) * 4  # counted in the window
            assert rec.per_layer[1][1] == n_blk * (n_blk + 1) / 2 * 4 and rec.sparsity == pytest.approx(0.0)
            monkeypatch.setattr(sliding_window, "WINDOW_KERNEL_MIN_TOKENS", 256)
            windowed = model(ids).logits
            assert len(calls) == n_layers
    torch.testing.assert_close(own, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(windowed, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("second", ["cpu", 1])
def test_layers_split_over_devices(second):
    """A model whose layers accelerate placed on different devices (half on the first GPU, half on the CPU or on a
    second GPU): each layer runs its recipe where its tensors are (Triton kernels on a GPU, launched on that GPU
    whichever is current; the reference on the CPU), the logits match the one-device run, and generation with the
    budgeted KV cache works."""
    if second == 1 and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    import copy

    from accelerate import dispatch_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4, intermediate_size=512,
                         vocab_size=256, max_position_embeddings=4096, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    recipe = Recipe.uniform(config, "vertical_slash", block_size=64, vertical_tokens=256, slash_tokens=256)
    for li in (0, 2):  # streaming layers: windowed KV heads, so generate uses the head-budgeted cache
        recipe.layers[li] = [HeadPlan("streaming", {"sink_tokens": 64, "window_tokens": 256})] * 4
    assert recipe.compresses_kv
    single = copy.deepcopy(model).to("cuda")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": second, "model.layers.3": second, "model.norm": second, "lm_head": second}
    split = dispatch_model(model, device_map=device_map)
    ids = torch.randint(0, 256, (1, 1000), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), patchattn.patched(single, recipe), patchattn.patched(split, recipe):
        ref = single(ids.cuda()).logits.float().cpu()
        out = split(ids.cuda()).logits.float().cpu()
        assert ((out - ref).norm() / ref.norm()).item() < 3e-2
        generated = split.generate(ids.cuda(), max_new_tokens=8, do_sample=False)
        expected = single.generate(ids.cuda(), max_new_tokens=8, do_sample=False)
    assert generated.shape == expected.shape == (1, 1008)
    assert (generated[0, 1000:].cpu() == expected[0, 1000:].cpu()).float().mean() >= 0.75


def test_dense_prefix_rows_read_everything():
    """A recipe's dense_prefix_tokens: the first query blocks read every causal block (their logits equal dense), the
    rest keep their layout; calibration counts the prefix in the sparsity it reaches."""
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=32)
    recipe.dense_prefix_tokens = 200  # 7 blocks of 32
    assert recipe.dense_prefix_rows() == 7 and Recipe.from_dict(recipe.to_dict()).dense_prefix_tokens == 200
    ids = _ids(n=512, batch=1)
    with torch.no_grad():
        ref = model(ids).logits
        with patchattn.patched(model, recipe), record_sparsity() as rec:
            out = model(ids).logits
    torch.testing.assert_close(out[:, :224], ref[:, :224], atol=2e-4, rtol=2e-4)
    assert (out[:, 224:] - ref[:, 224:]).abs().max() > 1e-3
    # 16 blocks: rows 0-6 dense (28 blocks), rows 7-14 sink + previous + diagonal (3 each), the last row all 16
    assert rec.sparsity == pytest.approx(1 - (28 + 3 * 8 + 16) / 136, abs=1e-6)

    from patchattn.calibrate import calibrate

    calib = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(2))
    plain = calibrate(model, calib, target_sparsity=0.6, block_size=32)
    prefixed = calibrate(model, calib, target_sparsity=0.6, block_size=32, dense_prefix_tokens=256)
    assert prefixed.dense_prefix_tokens == 256
    for r in (plain, prefixed):
        assert abs(r.calibration["achieved_sparsity"] - 0.6) <= 0.02
    # the prefix is paid for by sparser budgets elsewhere: the model runs at the sparsity calibration reached
    with torch.no_grad(), patchattn.patched(model, prefixed), record_sparsity() as rec:
        model(calib)
    assert abs(rec.sparsity - prefixed.calibration["achieved_sparsity"]) <= 0.03


def test_token_columns_end_to_end_equal_masked_attention():
    """A recipe mixing token-granular vertical-slash heads with block heads runs, through the patched model, exactly
    the attention of a dense SDPA masked with each layer's blocks plus its columns (a reference attention function
    registered beside ours); the recorded sparsity counts the columns as tiles of block_size."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from patchattn.layout import column_reads, column_tiles, token_mask
    from patchattn.patch import CompiledRecipe, layer_layout

    model = tiny_model("llama")
    cfg = model.config
    plans = [
        HeadPlan("vertical_slash_tokens", {"vertical_tokens": 48, "slash_tokens": 32}),
        HeadPlan("streaming", {"sink_tokens": 32, "window_tokens": 32}),
        HeadPlan("vertical_slash_tokens", {"vertical_tokens": 96, "slash_tokens": 64}),
        HeadPlan("vertical_slash", {"vertical_tokens": 32, "slash_tokens": 32}),
    ]
    recipe = Recipe.uniform(cfg, "vertical_slash_tokens", block_size=32, vertical_tokens=64, slash_tokens=32)
    recipe.layers[0] = [plans[h % len(plans)] for h in range(cfg.num_attention_heads)]
    compiled = CompiledRecipe(recipe)
    expected = {"kept": 0.0, "causal": 0.0}

    def masked_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        keep, cols = layer_layout(compiled.layers[module.layer_idx], query, key, 32, columns=True)
        keep, counts = column_reads(keep, cols, 32)
        n, n_blk = query.shape[2], keep.shape[-1]
        mask = token_mask(keep, n, n, 32, cols, counts)
        group = query.shape[1] // key.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask=mask, scale=scaling
        )
        expected["kept"] += float(keep.sum() + column_tiles(counts, 32).sum())
        expected["causal"] += n_blk * (n_blk + 1) / 2 * query.shape[0] * query.shape[1]
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("patchattn_test_masked", masked_reference)
    ALL_MASK_ATTENTION_FUNCTIONS.register("patchattn_test_masked", sdpa_mask)
    ids = _ids(n=400, batch=1)
    with torch.no_grad():
        dense = model(ids).logits
        with patchattn.patched(model, recipe), record_sparsity() as rec:
            out = model(ids).logits
        model.set_attn_implementation("patchattn_test_masked")
        ref = model(ids).logits
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert rec.density == pytest.approx(expected["kept"] / expected["causal"], rel=1e-6)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy,params", [("dense", {}), ("block_topk", {"threshold": 0.9}), ("vertical_slash_tokens", {"vertical_tokens": 128, "slash_tokens": 256})])
@pytest.mark.parametrize("head_dim", [64, 256])
def test_model_window_on_gpu_runs_the_kernel(strategy, params, head_dim, monkeypatch):
    """A Gemma 3 shaped model in bf16 on the GPU: its sliding layers run the Triton kernel over the window's blocks
    (dense recipes included), and each layer's sparse call gives the PyTorch reference's output on the same inputs. (A
    whole-model comparison would not hold for data-dependent layouts: the bf16 kernels and the reference round each
    layer's output differently, so the next layer's estimate flips a selection here and there.)"""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    import patchattn.prefill as prefill
    from conftest import TINY

    config = Gemma3TextConfig(**(TINY | dict(hidden_size=256, num_hidden_layers=3, max_position_embeddings=4096)), num_key_value_heads=1,
                              head_dim=head_dim, sliding_window=300, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda", torch.bfloat16).eval()
    recipe = Recipe.uniform(config, strategy, block_size=64, **params)
    ids = _ids(n=2000, batch=1).cuda()
    errors = []  # per sparse call: its output against the reference's on the same inputs
    kernel_call = prefill.sparse_attention

    def compared(plan, query, key, value, block_size, scaling, backend, *args, **kwargs):
        out = kernel_call(plan, query, key, value, block_size, scaling, backend, *args, **kwargs)
        if backend != "torch":
            ref = kernel_call(plan, query, key, value, block_size, scaling, "torch", *args, **kwargs)
            errors.append(((out.float() - ref.float()).norm() / ref.float().norm()).item())
        return out

    with torch.no_grad():
        with patchattn.patched(model, recipe, backend="torch"):
            ref = model(ids).logits.float()
        monkeypatch.setattr(prefill, "sparse_attention", compared)
        with patchattn.patched(model, recipe), record_sparsity() as rec:
            out = model(ids).logits.float()
        monkeypatch.undo()
        dense = model(ids).logits.float()
    assert rec.kernels.get("triton", 0) >= 2, rec.kernels
    if strategy == "dense":  # no layout to flip: the whole model agrees with the reference and with dense
        assert ((out - ref).norm() / ref.norm()).item() < 2e-2
        assert ((out - dense).norm() / dense.norm()).item() < 2e-2
    else:
        assert len(errors) == 3 and max(errors) < 2e-2, errors


def test_auto_prefills_densely_where_no_sparse_kernel_runs_and_says_so_once(caplog):
    """On a CPU (float32) the sparse kernels cannot run and the PyTorch reference is slower than dense attention:
    backend "auto" (a user's default) prefills densely, says so once, and records no sparsity; "sparse" still runs the
    recipe's layouts (what calibration and eval's quality tasks measure)."""
    import logging

    import importlib

    patch_module = importlib.import_module("patchattn.patch")

    assert patch_module.DEFAULT_BACKEND == "sparse"  # the test suite's (conftest); a user's is "auto"
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    with torch.no_grad():
        dense = model(ids).logits
        with caplog.at_level(logging.WARNING), patch_module.patched(model, recipe, backend="auto"), record_sparsity() as auto:
            fast = model(ids).logits
            model(ids)
        with patch_module.patched(model, recipe, backend="sparse"), record_sparsity() as sparse:
            layouts = model(ids).logits
    assert torch.allclose(fast, dense, atol=1e-5) and auto.sparsity == 0.0
    assert caplog.text.count("the sparse prefill kernels cannot run here") == 1 and "backend='sparse'" in caplog.text
    assert not torch.allclose(layouts, dense, atol=1e-3) and sparse.sparsity > 0.3
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_module.patch(model, recipe, backend="fastest")


def test_a_layer_of_position_only_layouts_builds_each_shapes_layout_once(monkeypatch):
    """Dense and streaming heads' layouts depend on positions alone: a layer of them finishes a prompt shape's layout
    once and reuses it (same output); a layer with a data-dependent head builds it every time."""
    import patchattn.prefill as prefill_mod

    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    recipe.layers[1][0] = HeadPlan("block_topk", {"threshold": 0.8})
    calls = []
    real = prefill_mod.layer_layout
    monkeypatch.setattr(prefill_mod, "layer_layout", lambda plan, *a, **k: calls.append(plan) or real(plan, *a, **k))
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), patchattn.patched(model, recipe, backend="torch"):
        first = model(ids).logits
        second = model(ids).logits
        model(ids[:, :160])
        plans = compiled_for(model.config).layers
    assert torch.equal(first, second)
    assert [id(p) for p in calls] == [id(plans[0]), id(plans[1]), id(plans[1]), id(plans[0]), id(plans[1])]
    assert len(plans[0].static_layouts) == 0  # the patch left: its layouts went with it
