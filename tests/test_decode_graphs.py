"""A patched model's decode steps in generate's compile path: replayed as one graph of the whole forward
(:mod:`patchattn.decode_graphs`). On a CPU the graph is :class:`SimulatedGraph` (what a capture and a replay do to
the cache's host and device state, without CUDA); on a GPU the real CUDA graph, 256 greedy tokens against eager."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_model
from transformers import CompileConfig
from transformers.cache_utils import StaticCache

import patchattn
from patchattn import decode_graphs, hf
from patchattn.cache import HeadBudgetCache
from patchattn.recipe import KVPlan, Recipe

pytestmark = pytest.mark.internals  # generate's compile path: GenerationMixin.get_compiled_call and its memo
ON_GPU = torch.cuda.is_available()


def kv_recipe(model, quest_pages: int = 4):
    """Per layer a Quest head (full cache, 4 pages read) and a streaming one (sink 4 + window 32)."""
    recipe = Recipe.uniform(model.config, "dense")
    n_kv = model.config.num_key_value_heads
    plans = [KVPlan("full", decode_pages=quest_pages), KVPlan("window", sink_tokens=4, window_tokens=32)]
    recipe.kv_layers = [[plans[h % 2] for h in range(n_kv)] for _ in recipe.layers]
    return recipe


def batch(n=140, rows=2, pad=7, seed=1, device="cpu"):
    ids = torch.randint(0, 256, (rows, n), generator=torch.Generator().manual_seed(seed)).to(device)
    mask = torch.ones_like(ids)
    mask[rows - 1, :pad] = 0
    return ids, mask


def compile_everywhere() -> CompileConfig:
    """generate takes its compile path on a CPU too (transformers' switch for devices it would not compile on)."""
    config = CompileConfig()
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generate_with_a_static_cache_replays_each_decode_step_and_matches_eager(arch, caplog):
    """``cache_implementation="static"`` (the dense speed switch) gets the budgeted cache (the empty static cache
    generate built is replaced before its prefill), and generate's compile path runs the runner: the first decode step
    eagerly, every later one captured once and replayed, the tokens those of eager generate, a left-padded row included."""
    model = tiny_model(arch)
    ids, mask = batch()
    with patchattn.patched(model, kv_recipe(model), backend="torch"):
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
        runner = decode_graphs.runner_for(model)
        runner.graph_factory = decode_graphs.SimulatedGraph
        with caplog.at_level(logging.INFO, logger="patchattn"):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, cache_implementation="static",
                                 compile_config=compile_everywhere(), return_dict_in_generate=True)
    cache = hf.output_cache(out)
    assert isinstance(cache, HeadBudgetCache) and cache.get_seq_length() == 140 + 29
    assert runner.paths == {"eager": 1, "graph": 28}
    assert torch.equal(out.sequences, eager)
    assert "replay as one CUDA graph of the whole model (batch 2)" in caplog.text
    assert decode_graphs.runner_for(model) is None  # the patch left, and its runner with it


def test_a_cache_without_reserved_room_grows_eagerly_and_captures_again():
    """Outside generate the cache reserves only a little headroom: a step that would outgrow it runs eagerly (the pools
    reallocate, elsewhere in memory) and the next captures a new graph; the tokens are those of eager steps."""
    model = tiny_model("llama")
    ids, _ = batch(n=100, rows=1)
    recipe = kv_recipe(model)

    def greedy(step_fn, steps=80):
        cache = HeadBudgetCache.from_recipe(recipe, model.config)
        out = model(ids, use_cache=True, **{hf.cache_argument(model): cache})
        tokens = [out.logits[:, -1:].argmax(-1)]
        for i in range(steps):
            pos = torch.full((1, 1), 100 + i)
            out = step_fn(input_ids=tokens[-1], position_ids=pos, use_cache=True, **{hf.cache_argument(model): cache})
            tokens.append(out.logits[:, -1:].argmax(-1))
        return torch.cat(tokens, 1), cache

    with torch.no_grad(), patchattn.patched(model, recipe, backend="torch"):
        runner = decode_graphs.runner_for(model)
        runner.graph_factory = decode_graphs.SimulatedGraph
        eager, _ = greedy(model)
        graphed, cache = greedy(runner)
    assert torch.equal(graphed, eager)
    assert runner.paths["eager"] >= 2 and runner.paths["graph"] >= 70  # the first step, then each growth
    assert cache.get_seq_length() == 180


def test_what_a_replay_cannot_give_runs_eagerly_and_says_why(caplog):
    model = tiny_model("llama")
    ids, _ = batch(n=100, rows=1)
    with torch.no_grad(), patchattn.patched(model, kv_recipe(model), backend="torch"):
        runner = decode_graphs.runner_for(model)
        runner.graph_factory = decode_graphs.SimulatedGraph
        cache = HeadBudgetCache.from_recipe(kv_recipe(model), model.config, reserve_tokens=8)
        model(ids, use_cache=True, **{hf.cache_argument(model): cache})
        with caplog.at_level(logging.INFO, logger="patchattn"):
            runner(input_ids=ids[:, :2], use_cache=True, **{hf.cache_argument(model): cache})
            runner(input_ids=ids[:, :1], output_hidden_states=True, **{hf.cache_argument(model): cache})
            runner(ids[:, :1], **{hf.cache_argument(model): cache})
    assert runner.paths == {"eager": 3}
    assert "not one new token per row" in caplog.text and "asks for attentions or hidden states" in caplog.text
    assert "positional arguments" in caplog.text


def test_a_static_cache_the_caller_built_is_theirs():
    """Outside generate, a StaticCache passed to a patched forward is kept (and said), never replaced."""
    model = tiny_model("llama")
    ids, _ = batch(n=100, rows=1)
    static = StaticCache(config=model.config, max_cache_len=128)
    with patchattn.patched(model, kv_recipe(model), backend="torch"):
        out = model(ids, use_cache=True, **{hf.cache_argument(model): static})
    assert hf.output_cache(out) is static


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("fused,modules", [(False, "0"), (True, "1"), (True, "exact")])
def test_cuda_graph_decode_matches_eager_for_256_greedy_tokens(rows, fused, modules, monkeypatch):
    """The real graph on a GPU, bf16 with the Triton decode kernel: generate's compile path and eager generate give
    the same 256 greedy tokens (a left-padded row among three included), with the token write and the Quest bounds as
    the references' launches and every module eager (``PATCHATTN_FUSED_WRITE=0``, ``PATCHATTN_FUSED_QUEST=0``,
    ``PATCHATTN_DECODE_FUSE=0``) or as one Triton launch each (the default), the norms and MLPs compiled by inductor
    (``PATCHATTN_DECODE_FUSE=1``) or run by the eager-exact kernels (``=exact``)."""
    flag = "1" if fused else "0"
    monkeypatch.setenv("PATCHATTN_FUSED_WRITE", flag)
    monkeypatch.setenv("PATCHATTN_FUSED_QUEST", flag)
    monkeypatch.setenv("PATCHATTN_DECODE_FUSE", modules)
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    ids, mask = batch(n=300, rows=rows, pad=23 if rows > 1 else 0, device="cuda")
    with patchattn.patched(model, kv_recipe(model, quest_pages=6), backend="auto"):
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=256, min_new_tokens=256, do_sample=False)
        runner = decode_graphs.runner_for(model)
        graphed = model.generate(ids, attention_mask=mask, max_new_tokens=256, min_new_tokens=256, do_sample=False,
                                 cache_implementation="static")
    assert runner.paths == {"eager": 1, "graph": 254}
    assert (runner.fusion is not None and runner.fusion.calls["compiled"] > 0) == fused
    if modules == "exact":  # the kernels do eager's arithmetic on this GPU: every norm and MLP admitted
        assert runner.fusion.admitted and all(runner.fusion.admitted.values()), runner.fusion.admitted
    assert torch.equal(graphed, eager)


def test_eval_says_how_the_decode_steps_ran():
    """measure_speed records the decode path of its timed runs: eager on a CPU (transformers compiles on accelerators
    only), "cuda-graph" once the runner replays."""
    from patchattn.eval.tasks import decode_path, measure_speed

    model = tiny_model("llama")
    ids, _ = batch(n=200, rows=1)
    with patchattn.patched(model, kv_recipe(model), backend="torch"):
        result = measure_speed(model, ids[0].tolist(), decode_tokens=4, repeats=1)
        runner = decode_graphs.runner_for(model)
        before = dict(runner.paths)
        runner.paths.update({"eager": 1, "graph": 3})
        graphed = decode_path(model, torch.device("cuda"), before)
    assert result.decode_path == "eager" and result.kv_cache == "budgeted"
    assert graphed == "cuda-graph"
    assert decode_path(model, torch.device("cpu"), {}) == "eager"


def test_a_cache_that_stays_full_decodes_through_transformers_own_compile():
    """A short prompt keeps the full (static) cache, which the runner hands to transformers' own ``torch.compile`` of the
    model, as generate would have without the patch (here with the eager backend, on a CPU): the same tokens."""
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "streaming", sink_tokens=16, window_tokens=64)  # a 50-token prompt keeps it all
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(1))
    config = compile_everywhere()
    config.backend, config.mode = "eager", None
    with patchattn.patched(model, recipe, backend="torch"):
        eager = model.generate(ids, max_new_tokens=12, do_sample=False)
        model.generation_config.compile_config = config  # generate's own compile settings: the runner uses them too
        runner = decode_graphs.runner_for(model)
        out = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static",
                             return_dict_in_generate=True)
    model.generation_config.compile_config = None
    assert isinstance(hf.output_cache(out), StaticCache)
    assert runner.paths == {"compiled": 11}
    assert torch.equal(out.sequences, eager)
