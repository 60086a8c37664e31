"""CUDA graphs for short patched prefills (opt-in): the switch on CPU, and on a GPU the graphed forward against the
eager one (same logits, on fresh inputs after capture, every strategy class in one layer)."""

from __future__ import annotations

import pytest
import torch

import patchattn
from patchattn.compiled import compiled_for
from patchattn.patch import GRAPHS_KEY
from patchattn.recipe import HeadPlan, Recipe

ON_GPU = torch.cuda.is_available()


def _model(device="cpu", dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=4096, architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config).eval().to(device, dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(4.0)
    return model


def _recipe(config) -> Recipe:
    recipe = Recipe.uniform(config, "dense", block_size=64)
    plans = [
        HeadPlan("vertical_slash_tokens", {"vertical_tokens": 128, "slash_tokens": 128}, density=0.3),
        HeadPlan("streaming", {"sink_tokens": 64, "window_tokens": 256}, density=0.3),
        HeadPlan("block_topk", {"threshold": 0.8}, density=0.3),
        HeadPlan("vertical_slash", {"vertical_tokens": 128, "slash_tokens": 128}, density=0.3),
    ]
    recipe.layers = [list(plans) for _ in recipe.layers]
    return recipe


def test_switch_from_argument_and_environment(monkeypatch):
    model = _model()
    recipe = _recipe(model.config)
    with patchattn.patched(model, recipe):
        assert getattr(model.config, GRAPHS_KEY) is False
    monkeypatch.setenv("PATCHATTN_CUDA_GRAPHS", "1")
    with patchattn.patched(model, recipe):
        assert getattr(model.config, GRAPHS_KEY) is True
        ids = torch.randint(0, 256, (1, 300))
        with torch.no_grad():
            model(ids)  # on the CPU the switch changes nothing: eager reference path
        assert not compiled_for(model.config).graphs
    with patchattn.patched(model, recipe, cuda_graphs=False):
        assert getattr(model.config, GRAPHS_KEY) is False
        compiled = compiled_for(model.config)
        compiled.graphs["stand-in"] = object()
    assert not hasattr(model.config, GRAPHS_KEY)
    assert not compiled.graphs, "leaving the patch releases its graphs (and their memory)"
    patchattn.patch(model, recipe)
    compiled_for(model.config).graphs["stand-in"] = object()
    compiled = compiled_for(model.config)
    patchattn.unpatch(model)
    assert not compiled.graphs


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_graphed_prefill_matches_eager_gpu():
    model = _model("cuda", torch.bfloat16)
    recipe = _recipe(model.config)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (1, 1000), generator=gen).cuda() for _ in range(3)]
    with torch.no_grad():
        with patchattn.patched(model, recipe, cuda_graphs=False):
            eager = [model(ids).logits for ids in prompts]
        with patchattn.patched(model, recipe, cuda_graphs=True):
            graphed = [model(ids).logits for ids in prompts]  # the first captures, the others replay
            compiled = compiled_for(model.config)
            assert len(compiled.graphs) == model.config.num_hidden_layers
            assert all(g is not None for g in compiled.graphs.values()), "capture failed"
        assert not compiled.graphs, "leaving the patch releases its graphs"
    for e, g in zip(eager, graphed):
        torch.testing.assert_close(g.float(), e.float(), atol=2e-2, rtol=2e-2)
    with torch.no_grad(), patchattn.patched(model, Recipe.uniform(model.config, "dense", block_size=64)):
        dense = model(prompts[0]).logits
    assert (graphed[0].float() - dense.float()).abs().max() > 1e-2, "the recipe should change the output"


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_graphs_again_after_a_patch_released_its_own_gpu():
    """A second patched session (same or another model) captures again: leaving the first freed its graphs and with
    them the allocator's pool, whose handle must not be reused (found on an H100: the capture failed with an
    allocator assert and ran eagerly)."""
    model = _model("cuda", torch.bfloat16)
    recipe = _recipe(model.config)
    ids = torch.randint(0, 256, (1, 700), generator=torch.Generator().manual_seed(3)).cuda()
    for _ in range(2):
        with torch.no_grad(), patchattn.patched(model, recipe, cuda_graphs=True):
            model(ids)
            compiled = compiled_for(model.config)
            assert len(compiled.graphs) == model.config.num_hidden_layers
            assert all(g is not None for g in compiled.graphs.values()), "capture failed"


def test_graph_cache_is_bounded_and_failures_fall_back(monkeypatch, caplog):
    """A capture that fails is remembered as None (eager from then on, one warning); the cache keeps at most
    MAX_GRAPHS graphs, dropping the oldest."""
    from patchattn import graphs

    cache: dict = {}
    q = torch.zeros(1, 1, 4, 4)
    if not ON_GPU:
        assert graphs.graph_for(cache, ("cpu",), lambda *a: q, q, q, q) is None and cache == {("cpu",): None}
        assert "running eagerly" in caplog.text
    made = []
    monkeypatch.setattr(graphs, "GraphedAttention", lambda fn, *a: made.append(fn) or fn)
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 3)
    cache = {}
    for i in range(5):
        assert graphs.graph_for(cache, (i,), f"graph{i}", q, q, q) == f"graph{i}"
    assert list(cache) == [(2,), (3,), (4,)]
    assert graphs.graph_for(cache, (3,), "other", q, q, q) == "graph3" and len(made) == 5
