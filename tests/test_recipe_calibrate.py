"""Recipes (schema, validation, atomic save) and calibration (allocation meets the target)."""

import itertools
import json
import re

import pytest
import torch
from conftest import tiny_model

import patchattn
from patchattn.calibrate import calibrate, uniform_baseline
from patchattn.calibrate.allocate import allocate
from patchattn.errors import PatchattnError, RecipeError
from patchattn.recipe import SCHEMA_VERSION, HeadPlan, KVPlan, Recipe


def test_recipe_round_trip(tmp_path):
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "vertical_slash", block_size=32, vertical_tokens=64, slash_tokens=128)
    path = recipe.save(tmp_path / "r.json")
    loaded = Recipe.load(path)
    assert loaded.to_dict() | {"name": ""} == recipe.to_dict() | {"name": ""}
    assert loaded.name == "vertical_slash"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"], "a temporary file was left behind"


def test_plan_hash_follows_the_plan_not_the_name_or_stats(tmp_path):
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    loaded = Recipe.load(recipe.save(tmp_path / "r.json"))
    loaded.name, loaded.calibration = "other", {"seq_len": 4096}
    loaded.layers[0][0].density = 0.5
    assert loaded.plan_hash() == recipe.plan_hash()
    loaded.layers[1][3].params["window_tokens"] = 96
    assert loaded.plan_hash() != recipe.plan_hash()
    for change in (dict(block_size=64), dict(min_sparse_tokens=512), dict(dense_prefix_tokens=64)):
        other = Recipe.load(tmp_path / "r.json")
        for key, value in change.items():
            setattr(other, key, value)
        assert other.plan_hash() != recipe.plan_hash(), change
    other = Recipe.load(tmp_path / "r.json")
    other.kv_layers = [list(layer) for layer in other.kv_plans()]  # the implied KV plans written out: the same plan
    assert other.plan_hash() == recipe.plan_hash()
    other.kv_layers[0][0] = KVPlan("full")
    assert other.plan_hash() != recipe.plan_hash()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.update(schema_version=0), "schema version 0"),
        (lambda d: d.pop("layers"), "lacks layers"),
        (lambda d: d["layers"][0]["heads"][0].update(strategy="magic"), "unknown strategy"),
        (lambda d: d["layers"][1]["heads"][2]["params"].update(window_tokens=-1), "layer 1 head 2"),
        (lambda d: d["layers"].pop(), "layer/head counts"),
        (lambda d: d.update(block_size=48), "block_size 48"),
    ],
)
def test_recipe_validation(tmp_path, mutate, match):
    data = Recipe.uniform(tiny_model("llama").config, "streaming", sink_tokens=64, window_tokens=256).to_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=match):
        Recipe.load(path)


def test_recipe_not_json(tmp_path):
    path = tmp_path / "corrupt.json"
    path.write_text('{"schema_version": 1, "layers": [')
    with pytest.raises(RecipeError, match="not valid JSON"):
        Recipe.load(path)
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "missing.json")
    assert SCHEMA_VERSION == 3  # schema 1 recipes (no KV plans) still load: tests/test_cache.py


def _mixed_recipe_data() -> dict:
    """A tiny Llama's recipe with every strategy, statistics and KV plans, as JSON data (issue 16's holes)."""
    recipe = Recipe.uniform(tiny_model("llama").config, "dense", block_size=32)
    recipe.layers[1] = [
        HeadPlan("streaming", {"sink_tokens": 32, "window_tokens": 64}, 0.4, 0.8, 0.1),
        HeadPlan("block_topk", {"threshold": 0.8}, 0.3, 0.8, 0.2),
        HeadPlan("vertical_slash", {"vertical_tokens": 64, "slash_tokens": 32}, 0.5, 0.9, 0.05),
        HeadPlan("vertical_slash_tokens", {"vertical_tokens": 16, "slash_tokens": 64}),
    ]
    recipe.kv_layers = [[KVPlan("snapkv", budget_tokens=64, window_tokens=8, decode_pages=3), KVPlan("window", window_tokens=48)]] * 2
    return recipe.to_dict()


def _head(d, layer=1, head=2):
    return d["layers"][layer]["heads"][head]


def _kv(d, layer=0, head=0):
    return d["layers"][layer]["kv_heads"][head]


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        # 1. strategy budgets: ints are ints, in range; no unknown parameter
        (lambda d: _head(d)["params"].update(vertical_tokens=0.5), "layer 1 head 2: vertical_tokens must be an integer >= 0, not 0.5"),
        (lambda d: _head(d)["params"].update(vertical_tokens=-64), "layer 1 head 2: vertical_tokens must be an integer >= 0, not -64"),
        (lambda d: _head(d)["params"].update(slash_tokens=64.0), "slash_tokens must be an integer >= 0, not 64.0"),
        (lambda d: _head(d)["params"].update(slash_tokens=True), "slash_tokens must be an integer >= 0, not True"),
        (lambda d: _head(d)["params"].update(slash_tokens="64"), "slash_tokens must be an integer >= 0, not '64'"),
        (lambda d: _head(d)["params"].update(slash_tokens=2**31), "slash_tokens must be an integer <= 2147483647"),
        (lambda d: _head(d, 1, 3)["params"].update(vertical_tokens=None), "layer 1 head 3: vertical_tokens must be an integer"),
        (lambda d: _head(d)["params"].update(vertical_token=64), "bad parameters for strategy 'vertical_slash': unknown vertical_token"),
        (lambda d: _head(d, 1, 1)["params"].update(threshold=float("nan")), "layer 1 head 1: threshold must be a finite number in (0, 1]"),
        (lambda d: _head(d, 1, 1)["params"].update(threshold=0), "threshold must be a finite number in (0, 1], not 0"),
        (lambda d: _head(d, 1, 0)["params"].update(window_tokens=0), "layer 1 head 0: window_tokens must be an integer >= 1, not 0"),
        (lambda d: _head(d, 0, 0)["params"].update(window_tokens=64), "bad parameters for strategy 'dense': unknown window_tokens"),
        # 3. every other field
        (lambda d: d.update(schema_version=True), "schema version True"),
        (lambda d: d.update(schema_version=2.0), "schema version 2.0"),
        (lambda d: d.update(name=5), "name must be a string, not 5"),
        (lambda d: d.update(block_size="64"), "block_size '64' unsupported: use 16, 32, 64, 128, 256"),
        (lambda d: d.update(block_size=64.0), "block_size 64.0 unsupported"),
        (lambda d: d.update(block_size=None), "block_size None unsupported"),
        (lambda d: d.update(min_sparse_tokens=0.5), "min_sparse_tokens must be an integer >= 0, not 0.5"),
        (lambda d: d.update(dense_prefix_tokens=-1), "dense_prefix_tokens must be an integer >= 0, not -1"),
        (lambda d: d.update(min_sparse_token=512), "the recipe has unknown field(s) min_sparse_token"),
        (lambda d: d.update(calibration=[]), "calibration must be a JSON object, not []"),
        (lambda d: d.update(calibration={"model_windows": {"2": 48}}), 'model_windows keys must be layer indices from "0" to "1"'),
        (lambda d: d.update(calibration={"model_windows": {"0": 0.5}}), "calibration model_windows['0'] must be an integer >= 1"),
        (lambda d: d.update(layers={}), "layers must be a list, not {}"),
        (lambda d: d["layers"].__setitem__(0, []), "layer 0 must be a JSON object, not []"),
        (lambda d: d["layers"][0].update(heads={}), "layer 0 heads must be a list of 4 (num_heads), not {}"),
        (lambda d: d["layers"][0]["heads"].append(dict(d["layers"][0]["heads"][0])), "layer 0 heads must be a list of 4 (num_heads), not 5"),
        (lambda d: d["layers"][0]["heads"].__setitem__(1, "dense"), "layer 0 head 1 must be a JSON object, not 'dense'"),
        (lambda d: _head(d, 0, 1).pop("strategy"), "layer 0 head 1 lacks strategy"),
        (lambda d: _head(d, 0, 1).update(strategy=5), "layer 0 head 1: unknown strategy 5"),
        (lambda d: _head(d, 0, 1).update(strategy="Dense"), "layer 0 head 1: unknown strategy 'Dense'"),
        (lambda d: _head(d, 0, 1).update(params=[]), "layer 0 head 1: params must be a JSON object, not []"),
        (lambda d: _head(d, 0, 1).update(budget=3), "layer 0 head 1 has unknown field(s) budget"),
        (lambda d: _head(d).update(density=1.5), "layer 1 head 2: density must be a finite number in [0, 1], not 1.5"),
        (lambda d: _head(d).update(density="0.5"), "density must be a finite number in [0, 1], not '0.5'"),
        (lambda d: _head(d).update(kept_mass=-0.1), "kept_mass must be a finite number in [0, 1], not -0.1"),
        (lambda d: _head(d).update(output_error=float("inf")), "output_error must be a finite number >= 0, not inf"),
        (lambda d: d["layers"][0].update(kv_heads={}), "layer 0 kv_heads must be a list, one per KV head (2), not {}"),
        (lambda d: d["layers"][1].pop("kv_heads"), "kv_heads must be given for every layer"),
        (lambda d: d["layers"][0]["kv_heads"].__setitem__(1, "full"), "layer 0 kv head 1: KV plan must be a JSON object, not 'full'"),
        (lambda d: _kv(d).update(policy="magic"), "layer 0 kv head 0: unknown KV policy 'magic'"),
        (lambda d: _kv(d).pop("policy"), "layer 0 kv head 0: KV plan lacks policy"),
        (lambda d: _kv(d).update(budget_tokens=64.5), "layer 0 kv head 0: budget_tokens must be an integer >= 0, not 64.5"),
        (lambda d: _kv(d).update(decode_pages=-1), "decode_pages must be an integer >= 0, not -1"),
        (lambda d: _kv(d, 1, 1).update(window_tokens=None), "layer 1 kv head 1: window_tokens must be an integer >= 0, not None"),
        (lambda d: _kv(d, 1, 1).update(pages=3), "layer 1 kv head 1: KV plan has unknown field(s) pages"),
    ],
)
def test_recipe_refuses_a_malformed_field_by_name(mutate, fragment):
    """Issue 16: a malformed recipe raises RecipeError naming the field and saying what to do, never another error."""
    data = _mixed_recipe_data()
    Recipe.from_dict(data)  # the unmutated recipe loads
    mutate(data)
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data, source="recipe r.json")
    message = str(info.value)
    assert fragment in message and message.startswith("recipe r.json") and "patchattn calibrate" in message and "\n" not in message


def test_recipe_statistics_in_range_load():
    """Relative output errors above 1 are real (the sparse output is off by more than the dense one's size); null
    statistics are a recipe without calibration."""
    data = _mixed_recipe_data()
    _head(data).update(output_error=3.0, density=None, kept_mass=1.0)
    _head(data, 1, 1).update(density=0, kept_mass=0.0)
    _head(data, 1, 1)["params"]["threshold"] = 1  # a JSON number that happens to be an integer
    recipe = Recipe.from_dict(data)
    assert recipe.layers[1][2].output_error == 3.0 and recipe.layers[1][1].build().threshold == 1


def test_strategies_refuse_bad_budgets_however_built():
    """The checks sit in the strategies and KV plans themselves: code that builds one directly is refused too."""
    from patchattn.strategies import VerticalSlash, VerticalSlashTokens, get_strategy

    for build in (lambda: VerticalSlash(vertical_tokens=0.5), lambda: VerticalSlashTokens(slash_tokens=-1),
                  lambda: get_strategy("streaming", sink_tokens=16.0), lambda: get_strategy("block_topk", threshold=True),
                  lambda: KVPlan("window", window_tokens=0.5), lambda: KVPlan("snapkv", budget_tokens=64, window_tokens=8, decode_pages=True),
                  lambda: Recipe.uniform(tiny_model("llama").config, "vertical_slash", vertical_tokens=-1)):
        with pytest.raises(ValueError):
            build()


def _rehash(model: dict) -> dict:
    """What a determined hand-editor does after changing the model description: recompute its config_hash."""
    from patchattn.recipe.identity import config_hash

    return {**model, "config_hash": config_hash(model)}


def test_recipe_edited_for_another_geometry_is_refused(tmp_path):
    """Issue 16: a recipe whose model description was hand-edited (num_kv_heads 9 crashed generate in the cache) is
    refused at load when the fields no longer give its hash, and by check_model, field by field, when they do."""
    model = tiny_model("llama")
    data = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64).to_dict()
    edits = [("num_kv_heads", 9, "num_heads 4 is not a multiple of its num_kv_heads 9"), ("num_kv_heads", 1, "do not give its config_hash"),
             ("model_type", "qwen2", "do not give its config_hash"), ("hidden_size", 128, "do not give its config_hash")]
    for field, value, fragment in edits:
        (tmp_path / "r.json").write_text(json.dumps({**data, "model": {**data["model"], field: value}}))
        with pytest.raises(RecipeError, match=re.escape(fragment)):
            Recipe.load(tmp_path / "r.json")
    bad_sizes = [("num_kv_heads", 3, "num_heads 4 is not a multiple of its num_kv_heads 3"), ("head_dim", 0, "model head_dim must be an integer >= 1"),
                 ("vocab_size", "256", "model vocab_size must be an integer >= 1, not '256'"), ("model_type", None, "model model_type must be a string")]
    for field, value, fragment in bad_sizes:
        with pytest.raises(RecipeError, match=re.escape(fragment)):
            Recipe.from_dict({**data, "model": _rehash({**data["model"], field: value})})
    del data["model"]["config_hash"]
    with pytest.raises(RecipeError, match="model lacks config_hash"):
        Recipe.from_dict(data)

    data = Recipe.uniform(model.config, "dense").to_dict()
    edited = Recipe.from_dict({**data, "model": _rehash({**data["model"], "num_kv_heads": 4, "hidden_size": 128})})  # self-consistent
    with pytest.raises(RecipeError, match=re.escape("another model (num_kv_heads: recipe 4 vs model 2; hidden_size: recipe 128 vs model 64)")):
        edited.check_model(model.config)
    with pytest.raises(RecipeError, match="num_kv_heads"):
        patchattn.patch(model, edited)
    assert not hasattr(model.config, "patchattn_recipe"), "a refused recipe left the model patched"


def test_recipe_load_refuses_json_python_cannot_hold(tmp_path):
    """JSON that parses nowhere near a recipe: an integer of thousands of digits, nesting deeper than the parser."""
    for text in ('{"schema_version": 2, "block_size": ' + "9" * 5000 + "}", "[" * 100_000):
        (tmp_path / "r.json").write_text(text)
        with pytest.raises(RecipeError, match="cannot be parsed"):
            Recipe.load(tmp_path / "r.json")


def test_allocate_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    heads, cands = 4, 3
    for _ in range(20):
        density = torch.rand(heads, cands, generator=g)
        mass = torch.rand(heads, cands, generator=g)
        target = 0.3 + 0.4 * torch.rand(1, generator=g).item()
        choice = allocate(density, mass, target)
        assert density[torch.arange(heads), choice].mean() <= target + 1e-6
        best = max(
            (mass[torch.arange(heads), torch.tensor(c)].sum().item() for c in itertools.product(range(cands), repeat=heads)
             if density[torch.arange(heads), torch.tensor(c)].mean() <= target + 1e-6),
            default=None,
        )
        if best is not None:
            # Lagrangian + greedy is near-optimal, not exact: within 15% of the best total mass.
            assert mass[torch.arange(heads), choice].sum().item() >= 0.85 * best


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_calibrate_meets_target(target):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    layers_seen = []
    recipe = calibrate(model, ids, target_sparsity=target, block_size=32, on_layer=lambda i, s: layers_seen.append(i))
    assert layers_seen == [0, 1]
    achieved = recipe.calibration["achieved_sparsity"]
    assert target - 1e-6 <= achieved <= target + 0.02
    assert recipe.mean_density == pytest.approx(1 - achieved, abs=1e-4)
    assert all(0 <= h.kept_mass <= 1 + 1e-5 for layer in recipe.layers for h in layer)
    assert model.config._attn_implementation == "sdpa", "calibration must leave the model as it found it"
    baseline = uniform_baseline(recipe)
    assert len({(h.strategy, tuple(sorted(h.params.items()))) for layer in baseline.layers for h in layer}) == 1


def test_calibrate_leaves_a_models_own_window_layers_alone():
    """Gemma 3's sliding-window layers attend 48 tokens back whatever the recipe: they keep the model's window, are
    not scored, and the sparsity target is met on the full-attention layer alone."""
    model = tiny_model("gemma3")
    ids = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    scored = []
    recipe = calibrate(model, ids, target_sparsity=0.6, block_size=32, on_layer=lambda i, s: scored.append((i, s is not None)))
    assert scored == [(0, False), (1, True)]
    assert recipe.calibration["model_windows"] == {"0": 48}
    assert all(h.strategy == "dense" and h.density is None for h in recipe.layers[0])
    assert any(h.strategy != "dense" for h in recipe.layers[1])
    achieved = recipe.calibration["achieved_sparsity"]
    assert 0.6 - 1e-6 <= achieved <= 0.62
    assert recipe.mean_density == pytest.approx(1 - achieved, abs=1e-4)
    assert recipe.calibration["layer_density"][0] is None
    baseline = uniform_baseline(recipe)
    assert all(h.strategy == "dense" for h in baseline.layers[0]) and baseline.layers[1][0].strategy != "dense"
    from patchattn.calibrate.capture import model_windows

    assert model_windows(model.config, 1024) == [48, None] and model_windows(model.config, 48) == [None, None]


def test_calibrate_refuses_a_model_of_window_layers_only():
    model = tiny_model("mistral")  # every layer slides a 96-token window
    ids = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PatchattnError, match="own sliding window"):
        calibrate(model, ids, target_sparsity=0.5, block_size=32)


def test_retrieval_rows_continue_a_copied_passage_outside_the_last_block():
    from patchattn.calibrate.kv import EVAL_ROWS, with_copy_tail
    from patchattn.calibrate.capture import retrieval_rows

    n, block = 1000, 32  # a short last block (1000 = 31 * 32 + 8)
    ids = torch.randperm(5000, generator=torch.Generator().manual_seed(1))[:n][None]  # distinct tokens
    copied = with_copy_tail(ids, torch.Generator().manual_seed(0), eval_rows=EVAL_ROWS + block)
    rows = retrieval_rows(n, block)
    assert rows.numel() == EVAL_ROWS and int(rows.max()) < (n // block) * block  # before the last query block
    source = int((ids[0] == copied[0, rows[0]]).nonzero())  # where the first row's token came from
    assert source < n // 2 + 1
    assert torch.equal(copied[0, rows], ids[0, source : source + EVAL_ROWS])  # the rows continue one passage
    assert retrieval_rows(256, 32) is None  # too short to hold a copy


def test_row_weights_select_rows():
    """Scoring with all weight on one row equals scoring that row alone."""
    from patchattn.calibrate.scoring import score_layer
    from patchattn.strategies import STRATEGIES

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    cands = STRATEGIES["streaming"].budget_grid(256, 32) + STRATEGIES["vertical_slash"].budget_grid(256, 32)
    rows = torch.tensor([40, 100, 200])
    weighted = score_layer(q, k, v, cands, 32, rows, row_weights=torch.tensor([0.0, 1.0, 0.0]))
    alone = score_layer(q, k, v, cands, 32, rows[1:2])
    assert torch.allclose(weighted.kept_mass, alone.kept_mass, atol=1e-6)
    assert torch.allclose(weighted.output_error, alone.output_error, atol=1e-6)
    assert torch.equal(weighted.density, alone.density)


def test_residual_error_weighs_heads_by_what_they_add():
    """A head the output projection zeroes costs nothing when sparsified; the others' errors are shares of the layer
    output, and the residual objective gives the silent head the sparsest candidate."""
    from patchattn.calibrate.scoring import score_layer
    from patchattn.strategies import STRATEGIES

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    cands = STRATEGIES["streaming"].budget_grid(256, 32)
    out_proj = torch.randn(24, 2 * 16, generator=g)
    out_proj[:, 16:] = 0.0  # head 1 adds nothing to the residual stream
    scores = score_layer(q, k, v, cands, 32, torch.tensor([100, 150, 200, 250]), out_proj=out_proj)
    assert torch.all(scores.residual_error[1] == 0)
    assert scores.residual_error[0].max() > 0 and scores.output_error[1].max() > 0
    assert score_layer(q, k, v, cands, 32, torch.tensor([100]), out_proj=out_proj[:, :8]).residual_error is None
    recipe = calibrate(tiny_model("llama"), torch.randint(0, 256, (1, 1024), generator=g), target_sparsity=0.6, block_size=32, objective="residual")
    assert recipe.calibration["objective"] == "residual" and recipe.calibration["achieved_sparsity"] >= 0.6 - 1e-6


def test_calibrate_rejects_bad_target():
    with pytest.raises(PatchattnError, match="target_sparsity"):
        calibrate(tiny_model("llama"), torch.zeros(1, 512, dtype=torch.long), target_sparsity=1.5)


# ---- decode (KV) budgets ---------------------------------------------------------------------------
def test_calibrate_kv_budget_meets_target_and_records_plans():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    recipe = calibrate(model, ids, target_sparsity=0.5, block_size=32, kv_budget=0.4, decode_pages=8)
    stats = recipe.calibration["kv"]
    assert stats["achieved"] <= 0.4 + 1e-6 and stats["achieved"] > 0.3
    assert len(recipe.kv_layers) == 2 and all(len(layer) == 2 for layer in recipe.kv_layers)
    for plan in (p for layer in recipe.kv_layers for p in layer):
        assert plan.decode_pages == (8 if plan.policy in ("full", "snapkv") else 0)
    assert Recipe.from_dict(recipe.to_dict()).kv_layers == recipe.kv_layers
    with pytest.raises(PatchattnError, match="kv_budget"):
        calibrate(model, ids, kv_budget=1.5)


def test_kv_scores_match_brute_force():
    """Kept mass and output error of each KV plan, against a per-row computation in float64."""
    import math

    from patchattn.calibrate.kv import kv_candidates, score_kv_layer

    gen = torch.Generator().manual_seed(4)
    n, dim, rows = 400, 16, 64
    q = torch.randn(1, 4, n, dim, generator=gen) * 2
    k = torch.randn(1, 2, n, dim, generator=gen)
    v = torch.randn(1, 2, n, dim, generator=gen)
    cands = kv_candidates(n, eval_rows=rows, obs=16)
    scores = score_kv_layer(q, k, v, cands, eval_rows=rows)
    prompt = n - rows
    for ci, plan in enumerate(cands):
        if plan.policy == "snapkv":
            continue  # its selection is checked through the cache in tests/test_cache.py
        for h in range(2):
            masses, errors = [], []
            for qh in (2 * h, 2 * h + 1):
                for t in range(prompt, n):
                    p = torch.softmax(q[0, qh, t].double() @ k[0, h, : t + 1].double().T / math.sqrt(dim), -1)
                    pos = torch.arange(t + 1)
                    keep = (pos < plan.sink_tokens) | (pos > t - plan.window_tokens) if plan.policy == "window" else torch.ones(t + 1, dtype=torch.bool)
                    dense = p @ v[0, h, : t + 1].double()
                    kept = p[keep].sum()
                    sparse = (p * keep) @ v[0, h, : t + 1].double() / kept
                    masses.append(kept)
                    errors.append((sparse - dense).norm() / dense.norm())
            assert abs(scores.kept_mass[h, ci].item() - torch.stack(masses).mean().item()) < 1e-4
            assert abs(scores.output_error[h, ci].item() - torch.stack(errors).mean().item()) < 1e-3
        if plan.policy == "full":
            assert torch.allclose(scores.cost[:, ci], torch.ones(2)) and torch.allclose(scores.kept_mass[:, ci], torch.ones(2))
        else:
            assert torch.allclose(scores.cost[:, ci], torch.full((2,), (plan.sink_tokens + plan.window_tokens) / prompt), atol=2 / prompt)


def test_quest_recall_matches_brute_force_and_sets_pages():
    import math

    from patchattn.calibrate.kv import QUEST_PAGE_BUDGETS, pages_for_recall, quest_recall

    gen = torch.Generator().manual_seed(6)
    n, rows, dim, page = 16 * 40 + 8, 8, 16, 16
    prompt = n - rows
    q = torch.randn(1, 4, rows, dim, generator=gen) * 3
    k = torch.randn(1, 2, n, dim, generator=gen)
    positions = torch.arange(n)
    scores = torch.einsum("bhrd,bhnd->bhrn", q, k.repeat_interleave(2, 1)) / math.sqrt(dim)
    causal = positions[None, :] <= torch.arange(prompt, n)[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    recall = quest_recall(q, k, probs, prompt)
    n_pages = prompt // page
    for h in range(2):
        for bi, budget in enumerate(QUEST_PAGE_BUDGETS):
            if budget >= n_pages:
                assert recall[h, bi] == 1.0
                continue
            total = 0.0
            for r in range(rows):
                bounds = []
                for p in range(n_pages):
                    keys = k[0, h, p * page : (p + 1) * page].double()
                    lo, hi = keys.amin(0), keys.amax(0)
                    bounds.append(max(torch.maximum(q[0, qh, r].double() * lo, q[0, qh, r].double() * hi).sum().item() for qh in (2 * h, 2 * h + 1)))
                bounds[0] = float("inf")
                chosen = sorted(range(n_pages), key=lambda p: -bounds[p])[:budget]
                for qh in (2 * h, 2 * h + 1):
                    read = sum(probs[0, qh, r, p * page : (p + 1) * page].sum().item() for p in chosen)
                    total += read + probs[0, qh, r, n_pages * page :].sum().item()
            assert abs(recall[h, bi].item() - total / (2 * rows)) < 1e-4
    assert pages_for_recall(torch.tensor([[0.5, 0.9, 0.97, 1.0, 1.0, 1.0, 1.0, 1.0]]), 0.95) == [32]
    assert pages_for_recall(torch.tensor([[0.1] * 7 + [0.96]]), 0.95) == [0]  # only the largest budget: read all

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    recipe = calibrate(model, ids, target_sparsity=0.0, block_size=32, kv_budget=1.0, decode_recall=0.9)
    plans = [p for layer in recipe.kv_layers for p in layer]
    assert all(p.policy == "full" and p.decode_pages in (0, *QUEST_PAGE_BUDGETS) for p in plans)
    with pytest.raises(PatchattnError, match="need kv_budget"):
        calibrate(model, ids, decode_recall=0.9)


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Files written through a temporary name get what open() would give them (umask applied), not mkstemp's 0600."""
    import os

    from patchattn.io import write_text_atomic

    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644 and path.read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_token_columns_are_scored_as_they_run():
    """A token-granular vertical-slash candidate's scored density and kept mass are those of the attention it runs:
    its blocks plus its columns (each row's columns outside its blocks, in tiles of block_size; a row whose columns
    would cost as much as dense reads its blocks instead), and its output error that of the renormalised attention over
    exactly those keys; on sampled rows, with GQA and a dense prefix."""
    from patchattn.calibrate.scoring import score_layer
    from patchattn.layout import column_counts, column_reads, column_tiles, finalize, token_mask
    from patchattn.strategies import STRATEGIES

    g = torch.Generator().manual_seed(1)
    n, bs = 300, 32
    q = torch.randn(1, 4, n, 16, generator=g) * 2
    k, v = (torch.randn(1, 2, n, 16, generator=g) * s for s in (2, 1))
    cand = STRATEGIES["vertical_slash_tokens"](vertical_tokens=40, slash_tokens=32)
    rows = torch.tensor([37, 90, 150, 211, 260])
    scores = score_layer(q, k, v, [cand], bs, rows, dense_rows=2)
    est = cand.estimate(q, k, bs)
    cols = cand.columns(est)
    keep, counts = column_reads(finalize(cand.layout(est), 2), cols, bs, 2)
    assert int((cols < n).sum(-1).min()) == 40 and int(counts[..., -1].max()) == 0 and int(counts[..., :2].max()) == 0
    assert (counts < column_counts(cols, keep.shape[-1], bs, 2)).any(), "some row should read its blocks, not columns"
    n_blk = keep.shape[-1]
    expected_density = ((keep.sum((-1, -2)) + column_tiles(counts, bs).sum(-1)) / (n_blk * (n_blk + 1) / 2))[0]
    assert torch.allclose(scores.density[:, 0], expected_density)
    mask = token_mask(keep, n, n, bs, cols, counts)[0][:, rows]  # (H, R, N)
    kk, vv = k.repeat_interleave(2, 1)[0], v.repeat_interleave(2, 1)[0]
    logits = (q[0][:, rows] @ kk.transpose(-1, -2)) / 4.0
    probs = torch.softmax(logits.masked_fill(torch.arange(n)[None, :] > rows[:, None], float("-inf")), -1)
    assert torch.allclose(scores.kept_mass[:, 0], (probs * mask).sum(-1).mean(-1), atol=1e-5)
    sparse = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ vv
    dense = probs @ vv
    error = ((sparse - dense).norm(dim=-1) / dense.norm(dim=-1)).mean(-1)
    assert torch.allclose(scores.output_error[:, 0], error, atol=1e-4)
    block_only = score_layer(q, k, v, [STRATEGIES["vertical_slash"](vertical_tokens=bs, slash_tokens=32)], bs, rows, dense_rows=2)
    assert (scores.kept_mass[:, 0] > block_only.kept_mass[:, 0]).all(), "the columns should add mass"


def test_token_candidates_scored_in_any_order_agree():
    """Candidates of several vertical budgets, interleaved, score as each does alone (the column cache keeps one set)."""
    from patchattn.calibrate.scoring import score_layer
    from patchattn.strategies import STRATEGIES

    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g)
    cls = STRATEGIES["vertical_slash_tokens"]
    a, b = cls(vertical_tokens=32, slash_tokens=32), cls(vertical_tokens=96, slash_tokens=64)
    rows = torch.tensor([50, 120, 200])
    together = score_layer(q, k, v, [a, b, a], 32, rows)
    for i, cand in enumerate([a, b, a]):
        alone = score_layer(q, k, v, [cand], 32, rows)
        assert torch.allclose(together.kept_mass[:, i], alone.kept_mass[:, 0])
        assert torch.allclose(together.output_error[:, i], alone.output_error[:, 0])
    assert not torch.allclose(together.kept_mass[:, 0], together.kept_mass[:, 1])


# ---- layer probes ------------------------------------------------------------------------------


def _probe_setup(n_tokens=1024):
    from conftest import byte_tokenizer

    from patchattn.calibrate import needle_probes

    ids = torch.randint(0, 256, (1, n_tokens), generator=torch.Generator().manual_seed(3))
    return byte_tokenizer(), ids, needle_probes


def test_needle_probes_hide_a_number_and_ask_for_it():
    tok, ids, needle_probes = _probe_setup()
    probes = needle_probes(tok, ids, 3, seed=0)
    assert len(probes) == 3
    for p in probes:
        assert p.prompt.shape == ids.shape
        text, answer = tok.decode(p.prompt[0]), tok.decode(p.answer[0])
        value = answer.strip()
        assert value.isdigit() and len(value) == 7
        needle_at = text.index(f"is {value}.")
        assert text.endswith("? The secret number of the " + text.rsplit("the ", 1)[1])
        assert 0.05 < needle_at / len(text) < 0.85 and abs(p.depth - needle_at / len(text)) < 0.05
    assert len({tok.decode(p.answer[0]) for p in probes}) == 3, "each probe hides its own number"
    assert [tok.decode(p.answer[0]) for p in needle_probes(tok, ids, 3, seed=0)] == [tok.decode(p.answer[0]) for p in probes]
    with pytest.raises(PatchattnError, match="too short for layer probes"):
        needle_probes(tok, ids[:, :120], 1)


def test_layer_weights():
    from patchattn.calibrate.probe import layer_weights

    torch.testing.assert_close(layer_weights(torch.tensor([0.0, 0.4, -0.1, 0.1, 0.0])), torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0]))
    torch.testing.assert_close(layer_weights(torch.tensor([-0.2, 0.0])), torch.ones(2))
    # the NLL term adds its own tempered share; negative rises (noise) count as 0
    torch.testing.assert_close(
        layer_weights(torch.tensor([0.0, 0.4, 0.0, 0.0]), torch.tensor([0.002, 0.0, -0.001, 0.006])),
        torch.tensor([2.0, 3.0, 1.0, 1.0 + 3.0**0.5]),
    )
    torch.testing.assert_close(layer_weights(torch.zeros(3), torch.zeros(3)), torch.ones(3))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_layer_sensitivity_probes_only_sparse_layers(arch):
    from patchattn.calibrate import layer_sensitivity
    from patchattn.calibrate.probe import probe_scores
    from patchattn.recipe import HeadPlan

    tok, ids, needle_probes = _probe_setup(512)
    model = tiny_model(arch)
    probes = needle_probes(tok, ids, 2, seed=1)
    recipe = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    recipe.layers[0] = [HeadPlan("dense")] * len(recipe.layers[0])
    seen = []
    sens = layer_sensitivity(model, recipe, probes, on_layer=seen.append)
    assert seen == [0, 1]
    assert sens.answer_drop[0] == 0.0 and sens.answer_drop[1] != 0.0
    assert sens.nll_rise[0] == 0.0 and sens.nll_rise[1] != 0.0
    scores = [probe_scores(model, p) for p in probes]
    assert sens.dense_answer_logprob == pytest.approx(sum(s[0] for s in scores) / 2)
    assert sens.dense_nll == pytest.approx(sum(s[1] for s in scores) / 2)
    # the answer's log-probability is the sum over its tokens, read as greedy decoding reads them; the NLL is the
    # prompt's second half, teacher-forced
    p = probes[0]
    with torch.no_grad():
        logits = model(torch.cat([p.prompt, p.answer], 1)).logits[0].float()
    n = p.prompt.shape[1]
    expected = logits[n - 1 : -1].log_softmax(-1).gather(-1, p.answer[0][:, None]).sum()
    expected_nll = torch.nn.functional.cross_entropy(logits[n // 2 : n - 1], p.prompt[0, n // 2 + 1 :])
    answer, nll = probe_scores(model, p)
    assert answer == pytest.approx(float(expected), abs=1e-3)
    assert nll == pytest.approx(float(expected_nll), abs=1e-4)


def test_probe_nll_reads_the_last_positions_on_long_prompts(monkeypatch):
    """Past NLL_POSITIONS second-half positions the NLL reads the last ones (bounded logits memory)."""
    import patchattn.calibrate.probe as probe_mod

    tok, ids, needle_probes = _probe_setup(512)
    model = tiny_model("llama")
    p = needle_probes(tok, ids, 1, seed=2)[0]
    monkeypatch.setattr(probe_mod, "NLL_POSITIONS", 50)
    with torch.no_grad():
        logits = model(p.prompt).logits[0].float()
    n = p.prompt.shape[1]
    expected = torch.nn.functional.cross_entropy(logits[n - 51 : n - 1], p.prompt[0, n - 50 :])
    assert probe_mod.probe_scores(model, p)[1] == pytest.approx(float(expected), abs=1e-4)


def test_calibrate_with_probes_moves_budget_to_the_layer_that_loses_most():
    tok, ids, needle_probes = _probe_setup()
    model = tiny_model("llama")
    plain = calibrate(model, ids, target_sparsity=0.6, block_size=32)
    probed = calibrate(model, ids, target_sparsity=0.6, block_size=32, probes=needle_probes(tok, ids, 2))
    stats = probed.calibration["probe"]
    assert stats["prompts"] == 2 and len(stats["layer_drop"]) == len(stats["layer_nll_rise"]) == len(probed.layers)
    assert abs(probed.calibration["achieved_sparsity"] - 0.6) <= 0.02
    heavy = max(range(len(probed.layers)), key=lambda i: stats["layer_weight"][i])
    assert stats["layer_weight"][heavy] > 1.0
    assert probed.calibration["layer_density"][heavy] >= plain.calibration["layer_density"][heavy] - 1e-6
    assert "probe" not in plain.calibration


def test_needles_hold_only_the_windowed_candidates_to_the_answer_rows():
    from patchattn.calibrate.retrieval import NEEDLE_DEPTHS, needle_scores, windowed_columns
    from patchattn.calibrate.capture import score_text
    from patchattn.calibrate.options import CalibrationOptions

    tok, ids, needle_probes = _probe_setup()
    model = tiny_model("llama")
    needles = needle_probes(tok, ids, 2, seed=1, depths=NEEDLE_DEPTHS)
    scores = score_text(model, ids, CalibrationOptions(seq_len=ids.shape[1], block_size=32), None)
    found = needle_scores(model, needles, scores, 32, "output")
    columns = windowed_columns(scores.candidates)
    assert columns and found.columns == columns
    assert all(scores.candidates[i].name == "streaming" for i in columns)
    assert found.utility.shape == (len(scores.free), scores.utility.shape[1], len(columns))
    assert found.rows == sum(int(p.answer.shape[1]) for p in needles)
    assert bool(((found.far_share >= 0) & (found.far_share <= 1)).all())
    held = found.apply(scores)
    others = [i for i in range(len(scores.candidates)) if i not in columns]
    assert torch.equal(held.utility[..., others], scores.utility[..., others])
    assert torch.equal(held.utility[..., columns], torch.minimum(scores.utility[..., columns], found.utility))
    assert held.utility is not scores.utility and torch.equal(scores.utility, score_text(model, ids, CalibrationOptions(seq_len=ids.shape[1], block_size=32), None).utility)
    # no windowed candidate, or no needle: nothing to check
    assert needle_scores(model, (), scores, 32, "output") is None
    recipe = calibrate(model, ids, target_sparsity=0.6, block_size=32, needles=needles)
    record = recipe.calibration["needles"]
    assert record["prompts"] == 2 and record["rows"] == found.rows and record["depths"] == list(NEEDLE_DEPTHS)
    assert all(share >= record["reach_share"] for _, _, share in record["heads"])
    assert "needles" not in calibrate(model, ids, target_sparsity=0.6, block_size=32, strategies=["dense", "block_topk"], needles=needles).calibration


def test_needle_heads_threshold_the_far_share():
    from patchattn.calibrate.retrieval import REACH_SHARE, NeedleScores

    share = torch.tensor([[0.0, REACH_SHARE, 0.5], [0.09, 0.2, 1.0]])
    found = NeedleScores([1], torch.ones(2, 3, 1), share, 1, 4)
    assert found.heads([3, 7]) == [[3, 1, REACH_SHARE], [3, 2, 0.5], [7, 1, 0.2], [7, 2, 1.0]]


def test_a_kv_window_beyond_the_models_context_holds_the_context_at_most():
    """A window head's ring is allocated whole when the prefill ends, so a window longer than the context (10^8 tokens
    took 24 GB) is capped at the context by the cache: what the model can attend anyway."""
    from patchattn.cache import HeadBudgetCache

    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "dense")
    limit = model.config.max_position_embeddings
    recipe.kv_layers = [[KVPlan("window", sink_tokens=4, window_tokens=10**8), KVPlan("window", sink_tokens=4, window_tokens=64)]
                        for _ in recipe.layers]
    recipe.check_model(model.config)
    plans = HeadBudgetCache.from_recipe(recipe, model.config).layers[0].plans
    assert plans == [KVPlan("window", sink_tokens=4, window_tokens=limit - 4), KVPlan("window", sink_tokens=4, window_tokens=64)]


@pytest.mark.parametrize("edit,fragment", [
    (lambda c: c["candidates"][0].update(mean_density="high"), "calibration candidate 0 mean_density must be a finite number"),
    (lambda c: c["candidates"][1]["params"].update(window_tokens=-3), "calibration candidate 1: window_tokens must be an integer >= 1"),
    (lambda c: c["candidates"].__setitem__(0, "dense"), "calibration candidate 0 must be a JSON object"),
    (lambda c: c.update(candidates={"a": 1}), "calibration candidates must be a list"),
    (lambda c: c.pop("achieved_sparsity"), "candidates need calibration achieved_sparsity"),
    (lambda c: c.update(achieved_sparsity=1.5), "calibration achieved_sparsity must be a finite number in [0, 1]"),
])
def test_the_statistics_a_uniform_baseline_reads_are_checked(edit, fragment):
    """``eval --baseline uniform`` builds its twin from the calibration's candidates: a hand-broken one is refused when
    the recipe is read, not a KeyError in the middle of an eval."""
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "dense")
    recipe.calibration = {
        "achieved_sparsity": 0.5,
        "candidates": [
            {"strategy": "dense", "params": {}, "mean_density": 1.0, "mean_kept_mass": 1.0, "mean_output_error": 0.0},
            {"strategy": "streaming", "params": {"sink_tokens": 16, "window_tokens": 64}, "mean_density": 0.5, "mean_kept_mass": 0.9},
        ],
    }
    assert uniform_baseline(Recipe.from_dict(recipe.to_dict())).layers[0][0].strategy == "streaming"
    data = recipe.to_dict()
    edit(data["calibration"])
    with pytest.raises(RecipeError, match=re.escape(fragment)):
        Recipe.from_dict(data)
