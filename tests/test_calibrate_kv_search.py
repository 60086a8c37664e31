"""The loss bound over decoding: continuations decoded through the cache, and the KV budget raised until within it."""

import logging

import pytest
import torch
from conftest import tiny_model

from patchattn.calibrate import calibrate
from patchattn.calibrate import verify as verify_module
from patchattn.calibrate.kv_search import KV_SEARCH_MAX_STEPS, DecodeVerifier, continuation_nll, search_kv_budget
from patchattn.calibrate.search import LossBound
from patchattn.calibrate.verify import HeldOut
from patchattn.eval.tasks import token_nll
from patchattn.recipe import KVPlan, Recipe


def _held(n=2048, seed=1):
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))
    return ids, HeldOut(ids[:, 512:], ids[:, :1], "test text")


def test_a_continuation_fed_through_the_cache_reads_as_the_whole_forward():
    model = tiny_model("llama")
    window = torch.randint(0, 256, (1, 384), generator=torch.Generator().manual_seed(0))
    decoded = continuation_nll(model, window, 64)
    whole = float(token_nll(model, window)[-64:].double().sum())
    assert decoded == pytest.approx(whole, rel=1e-4)


def test_a_recipe_that_keeps_everything_decodes_as_dense_and_a_window_does_not():
    model = tiny_model("llama")
    _, held = _held()
    verifier = DecodeVerifier(model, held, 512)
    assert verifier.n_cont == 128 and len(verifier.windows) == 3  # as many of the 4 as the held-out text holds
    dense = Recipe.uniform(model.config, "dense", block_size=32)
    assert abs(verifier.loss(dense)) < 1e-4
    windowed = Recipe.uniform(model.config, "dense", block_size=32)
    windowed.kv_layers = [[KVPlan("window", sink_tokens=16, window_tokens=32) for _ in range(2)] for _ in range(2)]
    assert abs(verifier.loss(windowed)) > 1e-3  # the plans are in effect: the continuation reads other keys


class _FakeVerifier:
    n_cont, windows = 128, [None]

    def __init__(self, loss_of_kept):
        self.loss_of_kept, self.seen = loss_of_kept, []

    def loss(self, recipe):
        kept = recipe.kv_layers[0][0]
        self.seen.append(kept)
        return self.loss_of_kept(kept)


def _allocate(budget):  # plans stand for the share they keep
    return [[budget]], {"budget": budget, "achieved": budget}


@pytest.mark.parametrize("needed, expect", [(0.2, 0.3), (0.55, None), (1.5, 1.0)])
def test_the_kv_budget_rises_from_the_asked_one_until_the_decoded_loss_is_within_the_bound(needed, expect, caplog):
    """Loss 0.02 at the budget the plans need and growing as they keep less: the asked budget when it is enough,
    else the smallest within the bound found by bisection, else the whole cache (said)."""
    verifier = _FakeVerifier(lambda kept: 0.02 * (needed / kept) ** 2)
    recipe = Recipe.uniform(tiny_model("llama").config, "dense", block_size=32)
    with caplog.at_level(logging.WARNING):
        plans, stats, record = search_kv_budget(verifier, recipe, _allocate, 0.3, LossBound(0.02))
    assert len(record) <= KV_SEARCH_MAX_STEPS and record[0]["budget"] == pytest.approx(0.3)
    chosen = plans[0][0]
    if expect is not None:
        assert chosen == pytest.approx(expect)
    else:
        assert needed <= chosen <= needed + 0.05 * 1.01 and any(r["within"] for r in record)
    assert stats["asked_budget"] == 0.3 and stats["budget"] == pytest.approx(chosen)
    within = [r["budget"] for r in record if r["within"]]
    over = [r["budget"] for r in record if not r["within"]]
    assert not within or not over or min(within) > max(over)
    assert ("keeps the whole cache" in caplog.text) == (expect == 1.0)


def test_calibrate_with_a_loss_bound_verifies_the_kv_plans(monkeypatch):
    monkeypatch.setattr(verify_module, "MIN_VERIFY_TOKENS", 512)
    model = tiny_model("llama")
    ids, held = _held()
    recipe = calibrate(model, ids[:, :512], max_loss="ppl=5%", held_out=held, block_size=32, kv_budget=0.3)
    search = recipe.calibration["kv_search"]
    assert search and search[0]["budget"] == pytest.approx(0.3)
    kv = recipe.calibration["kv"]
    assert kv["asked_budget"] == 0.3 and kv["budget"] >= 0.3 and kv["continuation_tokens"] == 128
    chosen = [r for r in search if r["budget"] == pytest.approx(kv["budget"])]
    assert not chosen or chosen[-1]["within"]
    assert recipe.kv_layers is not None
    assert Recipe.from_dict(recipe.to_dict()).kv_plans() == recipe.kv_layers


def test_the_calibration_table_shows_the_kv_budgets_tried(capsys):
    from patchattn.cli.calibrate_tables import _print_kv_search

    cal = {"kv": {"budget": 0.5, "asked_budget": 0.3, "continuation_tokens": 256, "windows": 4},
           "kv_search": [{"budget": 0.3, "kept": 0.29, "ppl_loss": 0.031, "within": False},
                         {"budget": 0.5, "kept": 0.49, "ppl_loss": 0.012, "within": True}]}
    _print_kv_search(cal)
    out = " ".join(capsys.readouterr().out.split())
    assert "KV budget within the bound" in out and "+3.10%" in out and "+1.20%" in out
    assert "lost more than the bound: the recipe keeps 0.500 of the cache" in out
