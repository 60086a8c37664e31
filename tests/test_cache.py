"""The head-budgeted KV cache: what each head keeps, decode attention over it, and generation with it.

Layer-level checks feed random keys and values through :class:`BudgetLayer` and compare each decode step with
attention over exactly the tokens the plan says the head keeps (computed here from the raw inputs, in float64).
Model-level checks run ``generate`` on tiny random models: a budget that keeps and reads everything gives the
same tokens as the dense model; real budgets free memory and run through the window's wrap.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

import patchattn
from patchattn import hf
from patchattn.cache import BudgetLayer, HeadBudgetCache, respect_sliding_window, sliding_windows
from patchattn.recipe import KVPlan, Recipe, RecipeError

pytestmark = pytest.mark.internals  # CI runs these on the oldest supported transformers too

BACKENDS = ["torch", "triton"]


def attention_over(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """q (G, D) attends the rows ``keep`` of k/v (T, D); float64."""
    scores = q.double() @ k[keep].double().T / math.sqrt(q.shape[-1])
    return torch.softmax(scores, -1) @ v[keep].double()


def run_layer(plans, n_prompt, n_steps, backend, seed=0, batch=1, group=2, dim=64, dtype=None):
    """Prefill ``n_prompt`` tokens, then decode ``n_steps``; yields (step, layer, q, k_all, v_all, out)."""
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or (torch.float16 if backend == "triton" else torch.float32)
    gen = torch.Generator().manual_seed(seed)
    n_kv = len(plans)
    total = n_prompt + n_steps
    k_all = torch.randn(batch, n_kv, total, dim, generator=gen)
    v_all = torch.randn(batch, n_kv, total, dim, generator=gen)
    q_all = torch.randn(batch, n_kv * group, total, dim, generator=gen) * 2
    layer = BudgetLayer(plans)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    layer.update(cast(k_all[:, :, :n_prompt]), cast(v_all[:, :, :n_prompt]))
    layer.finish_prefill(cast(q_all[:, :, :n_prompt]))
    for step in range(n_steps):
        t = n_prompt + step
        layer.update(cast(k_all[:, :, t : t + 1]), cast(v_all[:, :, t : t + 1]))
        out = layer.attend(cast(q_all[:, :, t : t + 1]), None, backend)[:, 0]
        yield step, layer, q_all[:, :, t], k_all, v_all, out.float().cpu()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_and_full_heads_attend_exactly_their_tokens(backend):
    plans = [KVPlan("window", sink_tokens=8, window_tokens=40), KVPlan("full"), KVPlan("window", sink_tokens=0, window_tokens=16)]
    tol = 2e-2 if backend == "triton" else 1e-5
    for step, layer, q, k_all, v_all, out in run_layer(plans, 70, 45, backend):
        t = 70 + step
        for h, plan in enumerate(plans):
            positions = torch.arange(t + 1)
            if plan.policy == "window":
                keep = (positions < plan.sink_tokens) | (positions > t - plan.window_tokens)
            else:
                keep = torch.ones(t + 1, dtype=torch.bool)
            ref = attention_over(q[0, 2 * h : 2 * h + 2], k_all[0, h, : t + 1], v_all[0, h, : t + 1], keep)
            assert rel_err(out[0, 2 * h : 2 * h + 2], ref) < tol, (step, h)
            held = sorted(layer.kept_positions(h)[0].tolist())
            assert held == positions[keep].tolist(), (step, h)
    # Window heads hold sink + window slots for ever; the full head grew with every token.
    assert layer.valid == [48, 115, 16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_snapkv_keeps_budget_by_observation_window(backend):
    plans = [KVPlan("snapkv", budget_tokens=48, window_tokens=8), KVPlan("full")]
    n = 120
    for step, layer, q, k_all, v_all, out in run_layer(plans, n, 3, backend, seed=3, batch=2):
        held = layer.kept_positions(0)
        for b in range(2):
            kept = held[b].tolist()
            assert len(kept) == 48 + step + 1 and kept == sorted(kept)
            assert set(range(n - 8, n + step + 1)) <= set(kept)  # the observation window and every new token
            keep = torch.zeros(n + step + 1, dtype=torch.bool)
            keep[kept] = True
            ref = attention_over(q[b, :2], k_all[b, 0, : n + step + 1], v_all[b, 0, : n + step + 1], keep)
            assert rel_err(out[b, :2], ref) < (2e-2 if backend == "triton" else 1e-5)
    # The prompt token the observation queries attend most (softmax over every key each can see) is kept.
    q_obs = _obs_queries(seed=3, batch=2, n=n)  # (B, G, obs, D)
    scores = torch.einsum("bgod,btd->bgot", q_obs, k_all[:, 0, :n].double()) / 8.0
    future = torch.arange(n)[None, :] > torch.arange(n - 8, n)[:, None]
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), -1)[..., : n - 8].sum((1, 2))
    top = weights.argmax(-1)
    for b in range(2):
        assert int(top[b]) in held[b].tolist()


def _obs_queries(seed, batch, n, group=2, n_kv=2, dim=64, obs=8):
    """The observation-window queries of head 0 as run_layer drew them."""
    gen = torch.Generator().manual_seed(seed)
    torch.randn(batch, n_kv, n + 3, dim, generator=gen)
    torch.randn(batch, n_kv, n + 3, dim, generator=gen)
    q_all = torch.randn(batch, n_kv * group, n + 3, dim, generator=gen) * 2
    return q_all[:, :group, n - obs : n].double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_quest_reads_the_pages_with_the_largest_bounds(backend):
    page = 16
    plans = [KVPlan("full", decode_pages=4), KVPlan("full", decode_pages=100)]
    for step, layer, q, k_all, v_all, out in run_layer(plans, 150, 20, backend, seed=5):
        t = 150 + step
        n_pages = -(-(t + 1) // page)
        keys = k_all[0, 0, : t + 1].double()
        # Page bounds from the raw keys: max over the group of sum_d max(q_d * min_d, q_d * max_d).
        pad = n_pages * page - (t + 1)
        kmin = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("inf")).view(n_pages, page, -1).amin(1)
        kmax = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("-inf")).view(n_pages, page, -1).amax(1)
        qg = q[0, :2].double()
        bound = torch.maximum(qg[:, None] * kmin, qg[:, None] * kmax).sum(-1).amax(0)
        bound[0] = bound[-1] = float("inf")
        pages = bound.topk(4).indices
        keep = torch.zeros(n_pages * page, dtype=torch.bool)
        for p in pages.tolist():
            keep[p * page : (p + 1) * page] = True
        keep = keep[: t + 1]
        ref = attention_over(q[0, :2], k_all[0, 0, : t + 1], v_all[0, 0, : t + 1], keep)
        tol = 2e-2 if backend == "triton" else 1e-5
        assert rel_err(out[0, :2], ref) < tol, step
        # A page budget above the page count reads everything: exact full attention.
        full = attention_over(q[0, 2:4], k_all[0, 1, : t + 1], v_all[0, 1, : t + 1], torch.ones(t + 1, dtype=torch.bool))
        assert rel_err(out[0, 2:4], full) < tol


def test_pool_grows_and_keeps_contents():
    plans = [KVPlan("full"), KVPlan("window", sink_tokens=4, window_tokens=20), KVPlan("full", decode_pages=2)]
    last_caps = None
    grew = False
    for step, layer, q, k_all, v_all, out in run_layer(plans, 30, 120, "torch", seed=7):
        grew |= last_caps is not None and layer.caps != last_caps
        last_caps = list(layer.caps)
    assert grew
    t = 30 + 119
    held = layer.keys[0, layer.offsets[0] : layer.offsets[0] + t + 1].cpu()
    assert torch.equal(held, k_all[0, 0, : t + 1])
    assert layer.kv_bytes() < 3 * layer.dense_kv_bytes()


def test_sliding_window_models_cap_plans():
    import transformers as tf

    config = tf.MistralConfig(sliding_window=96, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1)
    assert sliding_windows(config) == [96, 96]
    assert sliding_windows(tf.LlamaConfig(num_hidden_layers=3)) == [None] * 3
    capped = respect_sliding_window([KVPlan("full"), KVPlan("window", sink_tokens=4, window_tokens=32), KVPlan("snapkv", budget_tokens=200, window_tokens=8)], 96)
    assert [p.to_dict() for p in capped] == [
        {"policy": "window", "window_tokens": 96},
        {"policy": "window", "sink_tokens": 4, "window_tokens": 32},
        {"policy": "window", "window_tokens": 96},
    ]


# ----------------------------------------------------------------------------------- model level
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gpt2"])
def test_generate_with_everything_kept_matches_dense(arch):
    """KV plans that keep and read every token (Quest with a budget above the page count): the same greedy
    tokens as the dense model, through the budgeted cache (which generate picks up by itself)."""
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (2, 140), generator=torch.Generator().manual_seed(0))
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    recipe = Recipe.uniform(model.config, "dense")
    n_kv = recipe.model["num_kv_heads"]
    recipe.kv_layers = [[KVPlan("full", decode_pages=1000) for _ in range(n_kv)] for _ in recipe.layers]
    with patchattn.patched(model, recipe, backend="torch"):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    assert isinstance(hf.output_cache(out), HeadBudgetCache)
    assert torch.equal(out.sequences, dense)


def test_generate_with_budgets_frees_memory_and_survives_wrap():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(1))
    recipe = Recipe.uniform(model.config, "streaming", sink_tokens=16, window_tokens=64)
    assert all(p.policy == "window" for layer in recipe.kv_plans() for p in layer)  # derived from the streaming heads
    with patchattn.patched(model, recipe, backend="torch"):
        out = model.generate(ids, max_new_tokens=150, do_sample=False, return_dict_in_generate=True)
    cache = hf.output_cache(out)
    assert out.sequences.shape[1] == 450 and cache.get_seq_length() == 449
    assert cache.kv_bytes() < 0.25 * cache.dense_kv_bytes()
    # Unpatched again: generate uses transformers' own cache.
    plain = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert not isinstance(hf.output_cache(plain), HeadBudgetCache)


def test_prompts_the_plans_barely_shrink_keep_the_full_cache():
    """Windows longer than most of the prompt would save under 10%: generate keeps transformers' cache (faster, and
    no page headroom); a Quest head still gets the budgeted cache (it saves reads, not bytes)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(1))
    recipe = Recipe.uniform(model.config, "streaming", sink_tokens=16, window_tokens=280)
    with patchattn.patched(model, recipe, backend="torch"):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert recipe.compresses_kv and not isinstance(hf.output_cache(out), HeadBudgetCache)
    recipe.kv_layers = [[KVPlan("full", decode_pages=1000) for _ in range(2)] for _ in recipe.layers]
    with patchattn.patched(model, recipe, backend="torch"):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(hf.output_cache(out), HeadBudgetCache)


def test_recipe_kv_plans_round_trip_and_validate(tmp_path):
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "dense")
    recipe.kv_layers = [[KVPlan("snapkv", budget_tokens=64, window_tokens=8, decode_pages=3), KVPlan("full")] for _ in recipe.layers]
    path = recipe.save(tmp_path / "r.json")
    again = Recipe.load(path)
    assert again.kv_layers == recipe.kv_layers and again.compresses_kv
    data = recipe.to_dict()
    data["layers"][0]["kv_heads"][0] = {"policy": "window"}
    with pytest.raises(RecipeError, match="window_tokens"):
        Recipe.from_dict(data)
    data["layers"][0]["kv_heads"] = [{"policy": "full"}]
    with pytest.raises(RecipeError, match="one per KV head"):
        Recipe.from_dict(data)
    v1 = recipe.to_dict()
    v1["schema_version"] = 1
    for layer in v1["layers"]:
        layer.pop("kv_heads")
    assert Recipe.from_dict(v1).kv_layers is None and not Recipe.from_dict(v1).compresses_kv


@pytest.mark.parametrize("pad", [None, 40])
def test_beam_search_through_the_budgeted_cache_matches_dense(pad):
    """Beam search reorders the pools between steps (reorder_cache), and a left-padded batch's per-row counts with
    them: with everything kept, dense's beams."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1 if pad is None else 2, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1:, :pad] = 0
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False)
    recipe = Recipe.uniform(model.config, "dense")
    recipe.kv_layers = [[KVPlan("full", decode_pages=1000) for _ in range(2)] for _ in recipe.layers]
    with patchattn.patched(model, recipe, backend="torch"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False,
                             return_dict_in_generate=True)
    assert isinstance(hf.output_cache(out), HeadBudgetCache)
    assert torch.equal(out.sequences, dense)


def test_report_describes_kv_plans_of_a_dense_prefill_recipe():
    from patchattn.eval.runner import _variant_info
    from patchattn.eval.tables import describe_variant

    recipe = Recipe.uniform(tiny_model("llama").config, "dense")
    recipe.kv_layers = [[KVPlan("snapkv", budget_tokens=64, window_tokens=8), KVPlan("full", decode_pages=4)] for _ in recipe.layers]
    text = describe_variant(_variant_info(recipe))
    assert "heads: dense 8" in text and "uniform budget" not in text
    assert "KV heads: full + Quest pages 2, snapkv 2" in text


def test_snapkv_heads_vote_in_one_batch_each_with_its_budget():
    """Heads sharing an observation window are scored together; each keeps its own budget's top tokens (the same
    as scoring it alone) plus the window; a head with another window is scored apart."""
    from patchattn.cache import snapkv_votes

    gen = torch.Generator().manual_seed(7)
    n, dim, group = 150, 32, 2
    plans = [KVPlan("snapkv", budget_tokens=48, window_tokens=8), KVPlan("snapkv", budget_tokens=24, window_tokens=8),
             KVPlan("snapkv", budget_tokens=40, window_tokens=16)]
    key, value = torch.randn(2, 3, n, dim, generator=gen), torch.randn(2, 3, n, dim, generator=gen)
    query = torch.randn(2, 3 * group, n, dim, generator=gen)
    layer = BudgetLayer(plans)
    layer.update(key, value)
    layer.finish_prefill(query, scale=dim**-0.5)
    for h, plan in enumerate(plans):
        obs = plan.window_tokens
        q_obs = query[:, h * group : (h + 1) * group, -obs:][:, None]
        alone = snapkv_votes(q_obs, key[:, h : h + 1], dim**-0.5)[:, 0].topk(plan.budget_tokens - obs).indices.sort(-1).values
        expected = torch.cat([alone, torch.arange(n - obs, n).expand(2, -1)], -1)
        assert torch.equal(layer.kept_positions(h).long(), expected)
