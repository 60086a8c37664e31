"""The recipe parser under seeded random mutations (issue 16): every mutation of a valid recipe either loads into a
recipe that runs (a patched forward and a few tokens of generate on a tiny model) or raises RecipeError with a
one-line message; any other exception, at load or later, fails with the mutations that caused it."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

import patchattn
from patchattn.compiled import CompiledRecipe
from patchattn.errors import RecipeError
from patchattn.recipe import KV_POLICIES, HeadPlan, KVPlan, Recipe
from patchattn.strategies import STRATEGIES

SEED = 16
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.json"))

# What a mutation writes in place of a value: wrong types, out-of-range, fractional and huge numbers...
ODD_VALUES = [None, True, False, "", "abc", "64", [], [1], {}, {"x": 1}, -1, -64, 0.5, 64.0, -0.5, 1e308,
              float("inf"), float("nan"), 2**31, 10**18, 10**400]
# ...or plausible ones (counts and fractions, in range for some fields and not for others), and names.
PLAUSIBLE_VALUES = [0, 1, 2, 3, 4, 8, 16, 32, 48, 64, 100, 128, 256, 0.01, 0.3, 0.9, 1.0]
NAMES = [*STRATEGIES, *KV_POLICIES, "magic", "Dense", "llama", "gpt2"]
KEYS = ["extra", "policy", "params", "window_tokens", "vertical_tokens", "threshold", "heads", "kv_heads", "density",
        "block_size", "min_sparse_token", "num_layers"]


# ---- the bases --------------------------------------------------------------------------------------------------
def _mixed_llama(model) -> Recipe:
    """Four strategies in one layer, statistics, KV plans of every policy (Quest pages too) and the dense thresholds."""
    recipe = Recipe.uniform(model.config, "dense", block_size=32, name="mixed")
    recipe.layers[0] = [
        HeadPlan("streaming", {"sink_tokens": 32, "window_tokens": 64}, 0.4, 0.8, 0.1),
        HeadPlan("vertical_slash", {"vertical_tokens": 64, "slash_tokens": 32}, 0.5, 0.9, 0.05),
        HeadPlan("block_topk", {"threshold": 0.8}, 0.3, 0.8, 1.5),
        HeadPlan("vertical_slash_tokens", {"vertical_tokens": 16, "slash_tokens": 64}, 0.2, 0.7, 0.2),
    ]
    recipe.kv_layers = [
        [KVPlan("snapkv", budget_tokens=64, window_tokens=8, decode_pages=3), KVPlan("window", sink_tokens=16, window_tokens=48)],
        [KVPlan("full", decode_pages=2), KVPlan("full")],
    ]
    recipe.min_sparse_tokens, recipe.dense_prefix_tokens = 64, 32
    return recipe


def _windowed_gemma(model) -> Recipe:
    """Gemma 3's first layer keeps the model's own window (recorded under calibration's model_windows)."""
    recipe = Recipe.uniform(model.config, "vertical_slash", block_size=16, vertical_tokens=32, slash_tokens=32)
    recipe.layers[0] = [HeadPlan("dense") for _ in recipe.layers[0]]
    recipe.calibration = {"model_windows": {"0": 48}, "seq_len": 512}
    return recipe


def _config_like(model: dict):
    """A config with exactly a recipe's model description (what ``check_model`` reads)."""
    return SimpleNamespace(
        architectures=[model.get("architecture", "?")], model_type=model["model_type"], num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_heads"], num_key_value_heads=model["num_kv_heads"], head_dim=model["head_dim"],
        hidden_size=model["hidden_size"], vocab_size=model["vocab_size"],
    )


def _smollm_geometry(model: dict):
    """A random Llama of the shipped recipes' geometry (its own description), the MLP shrunk (not part of it)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=model["hidden_size"], num_hidden_layers=model["num_layers"], num_attention_heads=model["num_heads"],
        num_key_value_heads=model["num_kv_heads"], head_dim=model["head_dim"], vocab_size=model["vocab_size"],
        intermediate_size=16, max_position_embeddings=8192, tie_word_embeddings=True,  # SmolLM2's context
    )
    config.architectures = [model["architecture"]]
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


# ---- mutations --------------------------------------------------------------------------------------------------
def _paths(value, path=()):
    """Every place in the JSON tree (calibration statistics only one level deep: the parser reads little of them)."""
    yield path
    if path[:1] == ("calibration",) and len(path) >= 2 and path[1] != "model_windows":
        return
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*path, key))


def _get(data, path):
    for key in path:
        data = data[key]
    return data


def _odd(rng: random.Random):
    """A fresh copy of an odd value (a later mutation may edit a list or object in place)."""
    return copy.deepcopy(rng.choice(ODD_VALUES))


def _random_head(rng: random.Random) -> dict:
    """A head of a random strategy with random (mostly plausible) parameters and statistics."""
    name = rng.choice(list(STRATEGIES))
    params = {}
    for f in dataclasses.fields(STRATEGIES[name]):
        if rng.random() < 0.8:
            plausible = [0.1, 0.5, 0.9, 1.0, 1] if f.name == "threshold" else [0, 1, 16, 32, 48, 64, 100, 128, 512]
            params[f.name] = rng.choice(plausible) if rng.random() < 0.9 else _odd(rng)
    head = {"strategy": name, "params": params}
    if rng.random() < 0.5:
        head["density"] = rng.choice([0.0, 0.25, 1.0, 1.5, None])
    return head


def _random_kv(rng: random.Random) -> dict:
    plan = {"policy": rng.choice(KV_POLICIES)}
    for name in ("sink_tokens", "window_tokens", "budget_tokens", "decode_pages"):
        if rng.random() < 0.6:
            plan[name] = rng.choice([0, 1, 2, 3, 4, 8, 16, 32, 64, 100, 200]) if rng.random() < 0.9 else _odd(rng)
    return plan


def _mutate(data, rng: random.Random) -> tuple[object, str]:
    """One random change of ``data`` (in place where it can be): returns the new data and what was done."""
    paths = list(_paths(data))
    path = rng.choice(paths)
    op = rng.choices(["delete", "odd", "plausible", "duplicate", "add", "head", "kv", "kv_all"], [3, 4, 4, 1, 1, 2, 1, 1])[0]
    if op in ("head", "kv"):
        kind = "heads" if op == "head" else "kv_heads"
        slots = [p for p in paths if len(p) >= 2 and p[-2] == kind and isinstance(p[-1], int)]
        if slots:
            path = rng.choice(slots)
            _get(data, path[:-1])[path[-1]] = value = _random_head(rng) if op == "head" else _random_kv(rng)
            return data, f"set {list(path)} = {value}"
        op = "odd"
    if op == "kv_all":
        layers = data.get("layers") if isinstance(data, dict) else None
        model = data.get("model") if isinstance(data, dict) else None
        n_kv = model.get("num_kv_heads") if isinstance(model, dict) else 2
        if isinstance(layers, list) and isinstance(n_kv, int) and 0 < n_kv < 16:
            for layer in layers:
                if isinstance(layer, dict):
                    layer["kv_heads"] = [_random_kv(rng) for _ in range(n_kv)]
            return data, "set every layer's kv_heads: " + str([layer.get("kv_heads") for layer in layers if isinstance(layer, dict)])
        op = "odd"
    if not path:  # the whole recipe
        value = _odd(rng)
        return value, f"replace the recipe by {value!r}"
    parent, key = _get(data, path[:-1]), path[-1]
    current = parent[key]
    if op == "delete":
        del parent[key]
        return data, f"delete {list(path)}"
    if op == "duplicate" and isinstance(parent, list):
        parent.insert(key, json.loads(json.dumps(current)))
        return data, f"duplicate {list(path)}"
    if op == "add" and isinstance(current, dict):
        new_key = rng.choice(KEYS)
        current[new_key] = value = rng.choice(PLAUSIBLE_VALUES)
        return data, f"add {new_key!r} = {value!r} to {list(path)}"
    if op == "plausible":
        value = rng.choice(NAMES) if isinstance(current, str) else rng.choice(PLAUSIBLE_VALUES)
    else:
        value = _odd(rng)
    parent[key] = value
    return data, f"set {list(path)} = {value!r}"


# ---- what an accepted recipe must do ----------------------------------------------------------------------------
def _run(model, recipe: Recipe, prompt: torch.Tensor) -> None:
    """What a user does with a recipe: patch, a forward, a few tokens of generate (through the budgeted KV cache when
    the recipe compresses it)."""
    with torch.no_grad(), patchattn.patched(model, recipe, backend="torch"):
        logits = model(prompt[:, :96]).logits
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.isfinite(logits).all() and out.shape[1] == prompt.shape[1] + 3


def _fuzz(base: Recipe, n_mutations: int, seed: int, check, stats: dict) -> None:
    """Apply ``n_mutations`` seeded random mutation sets (1 to 3 changes each) to ``base``; ``check(recipe, plan_hash)``
    runs each accepted recipe, after it saved and read back as the same plan."""
    rng = random.Random(seed)
    text = json.dumps(base.to_dict())
    for i in range(n_mutations):
        data, done = json.loads(text), []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            data, what = _mutate(data, rng)
            done.append(what)
        try:
            recipe = Recipe.from_dict(data)
        except RecipeError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) < 500, f"mutation {i} ({'; '.join(done)}): message {message!r}"
            stats["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutation {i} of {base.name} ({'; '.join(done)}) raised {type(exc).__name__}: {exc}")
        stats["accepted"] += 1
        try:
            again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
            assert again.plan_hash() == recipe.plan_hash(), "the saved recipe reads back as another plan"
            recipe.mean_density, recipe.strategy_counts(), recipe.compresses_kv  # noqa: B018 - what reports read
            check(recipe, recipe.plan_hash())
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"mutation {i} of {base.name} ({'; '.join(done)}) loaded, then {type(exc).__name__}: {exc}")


def test_mutated_recipes_load_and_run_or_are_refused():
    """Three tiny-model bases: every distinct accepted plan runs on its tiny model."""
    stats = {"refused": 0, "accepted": 0, "ran": 0}
    prompt = torch.randint(1, 256, (1, 130), generator=torch.Generator().manual_seed(SEED))
    llama, gemma = tiny_model("llama"), tiny_model("gemma3")
    bases = [
        (llama, Recipe.uniform(llama.config, "streaming", block_size=32, name="streaming", sink_tokens=32, window_tokens=64)),
        (llama, _mixed_llama(llama)),
        (gemma, _windowed_gemma(gemma)),
    ]
    for b, (model, base) in enumerate(bases):
        seen: set[str] = set()

        def check(recipe, plan_hash, model=model, seen=seen):
            if plan_hash not in seen:
                seen.add(plan_hash)
                _run(model, recipe, prompt)
                stats["ran"] += 1

        check(base, base.plan_hash())
        _fuzz(base, 1500, SEED + b, check, stats)
    print(f"tiny bases: {stats}")
    assert stats["refused"] > 3000 and stats["accepted"] > 500 and stats["ran"] > 300, stats


def test_mutated_shipped_recipes_load_and_compile_or_are_refused():
    """The shipped recipes against their own model description: accepted mutations fit it and build every head's
    strategy; one mutated plan per recipe runs on a random model of that geometry (half a second a run on a CPU;
    the unmutated recipes run on the real model in test_shipped_recipes.py)."""
    stats = {"refused": 0, "accepted": 0, "ran": 0}
    prompt = torch.randint(1, 256, (1, 130), generator=torch.Generator().manual_seed(SEED))
    runner = {}
    for b, path in enumerate(RECIPES):
        base = Recipe.load(path)
        seen = {base.plan_hash()}

        def check(recipe, plan_hash, seen=seen):
            recipe.check_model(_config_like(recipe.model))
            CompiledRecipe(recipe)
            if plan_hash not in seen and len(seen) < 2:  # the first mutated plan
                seen.add(plan_hash)
                if "model" not in runner:
                    runner["model"] = _smollm_geometry(recipe.model)
                _run(runner["model"], recipe, prompt)
                stats["ran"] += 1

        _fuzz(base, 250, SEED + 100 + b, check, stats)
    print(f"shipped bases: {stats}")
    assert stats["refused"] > 900 and stats["accepted"] > 200 and stats["ran"] == len(RECIPES), stats
