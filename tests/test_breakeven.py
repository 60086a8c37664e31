"""Each layer's prefill break-even (patchattn.calibrate.breakeven): where the crossing lands, how a recipe keeps it,
and that a prompt under a layer's break-even prefills that layer densely and the others sparse. The timings here
are a cost model handed in (the real ones are GPU wall clocks, taken by `patchattn calibrate` on a GPU)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny_model

import patchattn
from patchattn.calibrate.breakeven import break_even_lengths, crossing, fit_break_even
from patchattn.checks import MAX_TOKENS
from patchattn.recipe import HeadPlan, Recipe, RecipeError
from patchattn.stats import record_sparsity


def test_the_crossing_is_interpolated_on_log_length():
    assert crossing([1024, 2048, 4096], [1, 2, 4], [0.5, 1, 2]) == 0  # never loses
    # still losing at the longest: the log-log line through the last two points, past it
    assert crossing([1024, 2048, 4096], [1, 1, 1], [16, 8, 4]) == 16384
    assert crossing([1024, 2048, 4096], [1, 1, 1], [4, 5, 6]) == MAX_TOKENS  # not falling: never sparse
    assert crossing([4096], [1], [2]) == MAX_TOKENS
    # sparse/dense 2.0 at 2048, 0.5 at 4096: the crossing is half-way on log length
    assert crossing([1024, 2048, 4096], [1, 1, 1], [3, 2, 0.5]) == 2897
    # a loss after a win counts: the crossing is after the last losing length
    assert 2048 < crossing([1024, 2048, 4096], [1, 1, 1], [0.9, 1.2, 0.6]) < 4096
    assert break_even_lengths(8192) == [2048, 4096, 8192] and break_even_lengths(2048) == [1024, 2048]


def streaming_layer0(model) -> Recipe:
    recipe = Recipe.uniform(model.config, "dense", block_size=32)
    recipe.layers[0] = [HeadPlan("streaming", {"sink_tokens": 32, "window_tokens": 128})] * len(recipe.layers[0])
    return recipe


def test_calibration_fits_each_sparse_layers_break_even_and_the_recipe_keeps_it(tmp_path):
    """A cost model where the layouts cost a fixed 3 units and the sparse kernel a fifth of dense (n^2): sparse loses
    at 512 and 1024 tokens and wins at 2048, so layer 0 (streaming) prefills densely up to its crossing (~1900);
    layer 1 (all dense) is never timed. The recipe writes it per layer (schema 3) and reads it back."""
    model = tiny_model("llama")
    recipe = streaming_layer0(model)
    calls = []

    def cost_model(fn, runs, device):
        n = fn().shape[2]
        sparse = len(calls) % 2 == 1  # each layer and length: dense first, then the sparse path
        calls.append((n, sparse))
        return (3 + 0.2 * (n / 1000) ** 2) if sparse else (n / 1000) ** 2

    ids = torch.randint(0, 256, (1, 2048), generator=torch.Generator().manual_seed(0))
    record = fit_break_even(model, recipe, ids, lengths=[512, 1024, 2048], timer=cost_model)
    assert calls == [(512, False), (512, True), (1024, False), (1024, True), (2048, False), (2048, True)]
    assert 1024 < recipe.layer_min_tokens[0] < 2048 and recipe.layer_min_tokens[1] == 0
    assert record["layers"][1] is None and record["layers"][0]["ratio"][-1] < 1 < record["layers"][0]["ratio"][1]
    path = recipe.save(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["schema_version"] == 3 and data["layers"][0]["min_sparse_tokens"] == recipe.layer_min_tokens[0]
    assert "min_sparse_tokens" not in data["layers"][1]
    assert Recipe.load(path).layer_min_tokens == recipe.layer_min_tokens
    assert Recipe.uniform(model.config, "dense").to_dict()["schema_version"] == 2  # nothing new to say: older readers read it
    data["layers"][0]["min_sparse_tokens"] = -5
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match="layer 0 min_sparse_tokens"):
        Recipe.load(tmp_path / "bad.json")


def test_a_prompt_under_a_layers_break_even_prefills_that_layer_densely(caplog):
    model = tiny_model("llama")
    recipe = streaming_layer0(model)
    recipe.layers[1] = list(recipe.layers[0])
    recipe.layer_min_tokens = [1000, 0]
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="patchattn"), patchattn.patched(model, recipe, backend="torch"):
        with record_sparsity() as short:
            model(ids, use_cache=False)
        with record_sparsity() as long:
            model(torch.cat([ids, ids], 1), use_cache=False)
        with patchattn.patched(model, recipe, backend="sparse"), record_sparsity() as quality:
            model(ids, use_cache=False)
    assert short.kernels == {"sdpa": 1, "torch": 1} and set(short.per_layer) == {0, 1}
    assert short.per_layer[0][0] == short.per_layer[0][1]  # layer 0 kept every causal block
    assert long.kernels == {"torch": 2}
    assert "600-token prompt is under the prefill break-even of 1 layer(s) (0)" in caplog.text
    # backend "sparse" measures the recipe's quality: its layouts run whatever this device's speed
    assert quality.kernels == {"torch": 2}


def test_eval_fits_the_break_even_of_a_recipe_that_has_none_for_its_gpu(caplog):
    """A recipe calibrated without a break-even (on a CPU) gets one for the speed rows of `patchattn eval` on a GPU,
    said in one line and recorded; a recipe whose break-even was timed on that GPU runs as it is, and so does any
    recipe on a CPU. (The device is named here so the logic runs without one; the timings are a cost model.)"""
    from patchattn.eval.break_even import fitted_on, for_speed
    from patchattn.eval.tables import break_even_note

    model = tiny_model("llama")
    recipe = streaming_layer0(model)
    ids = torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(0)).tolist()
    assert for_speed(model, recipe, ids) == (recipe, None)  # a CPU: nothing to fit
    timed = []

    def cost_model(fn, runs, device):
        n = fn().shape[2]
        timed.append(n)
        return (3 + 0.2 * (n / 1000) ** 2) if len(timed) % 2 == 0 else (n / 1000) ** 2

    with caplog.at_level(logging.WARNING, logger="patchattn"):
        runs, fitted = for_speed(model, recipe, ids, here="GPU X", timer=cost_model)
    assert runs is not recipe and recipe.layer_min_tokens is None  # the given recipe is left as it was
    assert 1024 < runs.layer_min_tokens[0] < 2048 and fitted_on(runs) == "GPU X"
    assert fitted == {"device": "GPU X", "lengths": [1024, 2048], "layer_min_tokens": runs.layer_min_tokens}
    assert runs.plan_hash() != recipe.plan_hash() and [h.strategy for h in runs.layers[0]] == [h.strategy for h in recipe.layers[0]]
    said = [r.getMessage() for r in caplog.records if "break-even" in r.getMessage()]
    assert len(said) == 1 and "GPU X" in said[0] and "calibrated without one" in said[0]
    assert for_speed(model, runs, ids, here="GPU X", timer=cost_model) == (runs, None)  # timed on this device already
    n_timed = len(timed)
    again, refit = for_speed(model, runs, ids, here="GPU Y", timer=cost_model)  # another device: timed again
    assert refit is not None and len(timed) > n_timed and "timed on GPU X" in caplog.records[-1].getMessage()
    note = break_even_note({"variants": {"dense": {"dense": True}, "r": {"speed_break_even": fitted}}})
    assert len(note) == 1 and note[0].startswith("r had no prefill break-even") and str(runs.layer_min_tokens[0]) in note[0]


def test_a_layer_under_the_models_sliding_window_is_timed_as_it_runs(monkeypatch):
    """Gemma 3's first layer has its own 48-token window: its dense path is patchattn's windowed dense attention and
    its layout is clipped to the window, as a prefill runs them; the full-attention layer is timed against causal SDPA
    with no window. Timing causal attention in a windowed layer would credit sparsity with what the window saves."""
    import sys

    from patchattn import sliding_window

    breakeven = sys.modules["patchattn.calibrate.breakeven"]
    model = tiny_model("gemma3")
    recipe = Recipe.uniform(model.config, "streaming", block_size=16, sink_tokens=16, window_tokens=32)
    ran = []
    monkeypatch.setattr(breakeven, "windowed_dense", lambda module, q, *a: ran.append(("windowed", module.layer_idx, a[4]))
                        or sliding_window.windowed_dense(module, q, *a))
    real_sparse = breakeven.sparse_attention
    monkeypatch.setattr(breakeven, "sparse_attention", lambda *a, **k: ran.append(("sparse", k["layer_idx"], k["window"]))
                        or real_sparse(*a, **k))
    calls = []

    def timer(fn, runs, device):
        calls.append(fn())
        return 1.0

    ids = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(0))
    breakeven.time_layers(model, recipe, ids, [128, 256], timer=timer)
    assert ran == [("windowed", 0, 48), ("sparse", 0, 48), ("sparse", 1, 0)] * 2
    assert len(calls) == 8 and all(torch.isfinite(out).all() for out in calls)
