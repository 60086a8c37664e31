"""Every registered KV policy, one parametrised set of checks: its recipe JSON, its validation, its keep rule, and that
the cache and calibration hold exactly what the policy says (prompt tokens kept, region sized, ring evictions, bytes).

Each policy's examples are its own calibration candidates (the first, and a Quest-reading twin where it reads pages),
so a newly registered policy is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from patchattn.cache import HeadBudgetCache, cap_to_context, respect_sliding_window
from patchattn.calibrate.kv import _held
from patchattn.kv_policies import POLICIES, observation_votes
from patchattn.recipe import KV_POLICIES, KVPlan

PROMPT, SIZES, OBS = 200, [24, 48], 8  # the candidates' ladder: windows of 64 sinks + 24, SnapKV budgets of 24
PAGE, BATCH, GROUP, DIM = 8, 2, 2, 16
SCALE = DIM**-0.5


def examples(name: str) -> list:
    cls = POLICIES[name]
    first = cls.candidates(PROMPT, SIZES, OBS)[0]
    return [first] + ([dataclasses.replace(first, decode_pages=2)] if cls.reads_pages else [])


ALL = [p for name in POLICIES for p in examples(name)]


def ranking(policy, query: torch.Tensor, key: torch.Tensor, head: int) -> torch.Tensor | None:
    """What the cache ranks ``head``'s prompt by when its keep rule asks for votes: (B, depth), best first."""
    needed = policy.votes_needed(key.shape[2])
    if needed is None:
        return None
    votes = observation_votes(query, key, needed[0], SCALE, torch.tensor([head]))[:, 0]
    return votes.topk(needed[1], dim=-1).indices


def prefill(plans: list[KVPlan], n: int, reserve: int, seed: int = 0, dtype=torch.float32):
    """A one-layer cache of ``plans`` after a prefill of ``n`` random tokens; (cache, query, key, value, gen)."""
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(BATCH, len(plans), n, DIM, generator=gen).to(dtype)
    value = torch.randn(BATCH, len(plans), n, DIM, generator=gen).to(dtype)
    query = (torch.randn(BATCH, len(plans) * GROUP, n, DIM, generator=gen) * 2).to(dtype)
    cache = HeadBudgetCache([plans], page_tokens=PAGE, reserve_tokens=reserve)
    cache.layers[0].update(key, value)
    cache.layers[0].finish_prefill(query, SCALE)
    return cache, query, key, value, gen


def test_the_registry_is_what_recipes_name():
    assert KV_POLICIES == tuple(POLICIES) == ("full", "window", "snapkv")
    with pytest.raises(ValueError, match="^unknown KV policy 'magic'; choose from full, window, snapkv$"):
        KVPlan.from_dict({"policy": "magic"})


@pytest.mark.parametrize("name", list(POLICIES))
def test_json_round_trip(name):
    cls = POLICIES[name]
    assert cls.name == name and cls.__dataclass_params__.frozen
    for policy in examples(name):
        plan = KVPlan.of(policy)
        data = json.loads(json.dumps(plan.to_dict()))
        assert data["policy"] == name and set(data) - {"policy"} <= {f.name for f in dataclasses.fields(cls)}
        again = KVPlan.from_dict(data)
        assert again == plan and again.to_dict() == data and again.build() == policy


@pytest.mark.parametrize("name", list(POLICIES))
def test_bad_sizes_are_refused_however_built(name):
    for field in dataclasses.fields(POLICIES[name]):
        for bad in (-1, 0.5, True):
            message = f"^{field.name} must be an integer >= 0, not {bad!r}$"
            with pytest.raises(ValueError, match=message):
                POLICIES[name](**{field.name: bad})
            with pytest.raises(ValueError, match=message):
                KVPlan.from_dict({"policy": name, field.name: bad})
    if not POLICIES[name].reads_pages:
        with pytest.raises(ValueError, match="^decode_pages applies to full and snapkv KV plans, not "):
            dataclasses.replace(examples(name)[0], decode_pages=2)


@pytest.mark.parametrize("plan,message", [
    ({"policy": "window"}, "a window KV plan needs window_tokens >= 1"),
    ({"policy": "window", "window_tokens": 8, "decode_pages": 2}, "decode_pages applies to full and snapkv KV plans, not window"),
    ({"policy": "snapkv", "budget_tokens": 8}, "a snapkv KV plan needs 0 < window_tokens <= budget_tokens"),
    ({"policy": "snapkv", "budget_tokens": 8, "window_tokens": 16}, "a snapkv KV plan needs 0 < window_tokens <= budget_tokens"),
])
def test_each_policy_says_what_its_rules_refuse(plan, message):
    """The messages recipes have always shown, from the plan and from the policy built directly."""
    with pytest.raises(ValueError, match=f"^{message}$"):
        KVPlan.from_dict(plan)
    sizes = {k: v for k, v in plan.items() if k != "policy"}
    with pytest.raises(ValueError, match=f"^{message}$"):
        POLICIES[plan["policy"]](**sizes)


@pytest.mark.parametrize("name", list(POLICIES))
def test_kept_tokens_is_what_the_keep_rule_keeps(name):
    gen = torch.Generator().manual_seed(1)
    for policy in examples(name):
        for n in (1, 7, 24, 50, 88, 89, 300):
            needed = policy.votes_needed(n)
            rankings = [None]
            if needed is not None:
                obs, depth = needed
                rankings.append(torch.randperm(n - obs, generator=gen)[:depth])
                rankings.append(torch.stack([torch.randperm(n - obs, generator=gen)[:depth] for _ in range(6)]).view(2, 3, depth))
            for ranked in rankings:
                kept = policy.keep(n, "cpu", ranked)
                assert kept.shape[-1] == policy.kept_tokens(n) <= n, (policy, n)
                flat = kept.reshape(-1, kept.shape[-1])
                assert ((flat[:, 1:] > flat[:, :-1]).all() and (flat >= 0).all() and (flat < n).all()), (policy, n)


@pytest.mark.parametrize("n", [40, 150])
def test_the_cache_holds_what_each_policy_keeps(n):
    """One head of every example in one layer: after the prefill each holds its keep rule's tokens in a region of its
    pool_slots; then, decode step after decode step (through a window's wrap), what calibration says the head reads
    (keep rule, then every new token, less what the policy evicts) is what the cache holds; growing heads grow, rings
    don't."""
    steps = 100
    plans = [KVPlan.of(p) for p in ALL]
    cache, query, key, value, gen = prefill(plans, n, reserve=steps)
    layer = cache.layers[0]
    caps = list(layer.caps)
    kept = []
    for h, policy in enumerate(ALL):
        ranked = ranking(policy, query, key, h)
        expected = policy.keep(n, "cpu", ranked).expand(BATCH, -1)
        assert torch.equal(layer.kept_positions(h).long().sort(-1).values, expected), policy  # slot order: a ring's wraps
        kept.append(expected.shape[-1])
        assert kept[h] == policy.kept_tokens(n)
        assert caps[h] == policy.pool_slots(kept[h] + steps, PAGE) and layer.caps_used(h) == policy.capacity(caps[h])
    ranks = [ranking(p, query, key, h) for h, p in enumerate(ALL)]
    for step in range(steps):
        t = n + step
        k_new, v_new = torch.randn(BATCH, len(ALL), 1, DIM, generator=gen), torch.randn(BATCH, len(ALL), 1, DIM, generator=gen)
        layer.update(k_new, v_new)
        layer.attend(torch.randn(BATCH, len(ALL) * GROUP, 1, DIM, generator=gen), SCALE, backend="torch")
        for h, policy in enumerate(ALL):
            ranked = None if ranks[h] is None else ranks[h][:, None]
            seen = _held(policy, ranked, torch.tensor([t]), n, t + 1, BATCH, 1)[:, 0, 0]  # (B, t + 1) calibration's view
            for b in range(BATCH):
                assert sorted(layer.kept_positions(h)[b].tolist()) == torch.nonzero(seen[b]).flatten().tolist(), (policy, t, b)
            assert layer.valid[h] == (kept[h] + step + 1 if policy.grows else min(kept[h] + step + 1, policy.capacity(0)))
    assert layer.caps == caps  # the reserve held: no reallocation


@pytest.mark.parametrize("name", list(POLICIES))
def test_a_models_caps_shrink_only_rings_and_spans_past_them(name):
    """The model's context caps a ring's span and leaves growing heads be; the model's own sliding window makes every
    head a ring that fits it."""
    for policy in examples(name):
        plan = KVPlan.of(policy)
        assert cap_to_context([plan], 10**6) == [plan]
        capped = cap_to_context([plan], 50)[0].build()
        assert capped == policy if policy.grows else capped.span_tokens == 50
        for window in (40, 10**6):
            windowed = respect_sliding_window([plan], window)[0]
            fits = not policy.grows and policy.span_tokens <= window
            assert windowed == plan if fits else windowed.build().span_tokens == window


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("n,dtype", [(40, torch.float32), (150, torch.float16)])
def test_byte_count_is_what_the_cache_holds(name, n, dtype):
    reserve = 13
    token_bytes = BATCH * DIM * torch.finfo(dtype).bits // 8
    for policy in examples(name):
        cache, *_ = prefill([KVPlan.of(policy)], n, reserve, dtype=dtype)
        assert cache.kv_bytes() == policy.kv_bytes(n, reserve, PAGE, token_bytes), policy


def test_a_layer_with_quest_heads_bounds_every_page():
    """Mixed in one layer, the heads' bytes add up, plus the page bounds a Quest layer keeps for its other heads too."""
    n, reserve = 150, 13
    cache, *_ = prefill([KVPlan.of(p) for p in ALL], n, reserve)
    token_bytes = BATCH * DIM * 4
    others = sum(p.pool_slots(p.kept_tokens(n) + reserve, PAGE) // PAGE for p in ALL if not p.decode_pages)
    assert cache.kv_bytes() == sum(p.kv_bytes(n, reserve, PAGE, token_bytes) for p in ALL) + 2 * token_bytes * others
