"""Vertical-slash with a mass budget: its density follows the prompt, grows with the mass, stays under its caps."""

import pytest
import torch
from conftest import tiny_model

import patchattn
from patchattn.layout import block_density, column_reads, finalize
from patchattn.recipe import Recipe
from patchattn.stats import record_sparsity
from patchattn.strategies import VerticalSlashAdaptive, VerticalSlashTokens

N, BLOCK, D = 1024, 32, 16


def _inputs(kind: str, seed: int = 0):
    """'local': each query matches its own key (attention on the diagonal); 'spread': queries of zeros (attention
    uniform over every earlier key)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, N, D, generator=g)
    q = 16.0 * k if kind == "local" else torch.zeros(1, 2, N, D)
    return q, k


def _cost(strategy, q, k) -> float:
    """Blocks and column tiles computed, as a share of the causal blocks (what calibration counts)."""
    est = strategy.estimate(q, k, BLOCK)
    keep, counts = column_reads(finalize(strategy.layout(est)), strategy.columns(est), BLOCK)
    n_blk = keep.shape[-1]
    return float(block_density(keep).mean() + (-(-counts // BLOCK)).sum(-1).float().mean() / (n_blk * (n_blk + 1) / 2))


def test_the_density_follows_the_prompt_where_a_count_budget_does_not():
    adaptive = VerticalSlashAdaptive(vertical_tokens=512, slash_tokens=512, mass=0.9)
    fixed = VerticalSlashTokens(vertical_tokens=256, slash_tokens=256)
    local, spread = _cost(adaptive, *_inputs("local")), _cost(adaptive, *_inputs("spread"))
    # attention on the diagonal needs nothing beyond the layout's floor (sink block, main diagonal, last query block:
    # 93 of 528 blocks); attention spread evenly needs several times more
    assert local == pytest.approx(93 / 528, abs=1e-3) and spread > 2.5 * local, (local, spread)
    fixed_local, fixed_spread = _cost(fixed, *_inputs("local")), _cost(fixed, *_inputs("spread"))
    assert abs(fixed_local - fixed_spread) < 0.05  # a count budget reads as much either way


def test_more_mass_keeps_more_and_caps_hold():
    q, k = _inputs("spread")
    previous_cols, previous_keep = None, None
    for mass in (0.3, 0.6, 0.9, 0.99):
        s = VerticalSlashAdaptive(vertical_tokens=256, slash_tokens=128, mass=mass)
        est = s.estimate(q, k, BLOCK)
        keep, cols = s.layout(est), s.columns(est)
        n_cols = (cols < N).sum(-1)
        assert int(n_cols.max()) <= 256
        diagonals = keep[0, :, -1].sum(-1)  # the last query block reads one block per kept diagonal (and the sink)
        assert int(diagonals.max()) <= 128 // BLOCK + 1
        if previous_keep is not None:
            assert bool((keep | ~previous_keep).all()), "a larger mass keeps every block a smaller one keeps"
            assert bool((n_cols >= previous_cols).all())
        previous_cols, previous_keep = n_cols, keep


def test_a_spread_prompt_runs_denser_than_a_local_one_in_the_patched_model():
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "vertical_slash_adaptive", block_size=32, vertical_tokens=512, slash_tokens=512, mass=0.8)
    g = torch.Generator().manual_seed(0)
    varied = torch.randint(0, 256, (1, 512), generator=g)
    repeated = torch.full((1, 512), 7)
    with torch.no_grad(), patchattn.patched(model, recipe, backend="torch"):
        with record_sparsity() as on_varied:
            model(varied)
        with record_sparsity() as on_repeated:
            model(repeated)
    assert on_varied.sparsity != pytest.approx(on_repeated.sparsity, abs=1e-3), "the layout follows the input"


def test_more_mass_brings_the_patched_model_closer_to_dense():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 512), generator=torch.Generator().manual_seed(1))
    errors = []
    with torch.no_grad():
        ref = model(ids).logits
        for mass in (0.3, 0.9, 0.999):
            recipe = Recipe.uniform(model.config, "vertical_slash_adaptive", block_size=32, vertical_tokens=4096, slash_tokens=4096, mass=mass)
            with patchattn.patched(model, recipe, backend="torch"):
                errors.append(float((model(ids).logits - ref).abs().mean()))
    assert errors[0] > errors[1] > errors[2], errors


def test_bad_mass_is_refused():
    with pytest.raises(ValueError, match="mass"):
        VerticalSlashAdaptive(mass=0.0)
    with pytest.raises(ValueError, match="mass"):
        VerticalSlashAdaptive(mass=1.5)
