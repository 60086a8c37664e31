"""Spread vertical-slash and block top-k in one head: the union of both layouts, one estimate each."""

import pytest
import torch
from conftest import tiny_model

import patchattn
from patchattn.layout import block_density
from patchattn.recipe import Recipe
from patchattn.stats import record_sparsity
from patchattn.strategies import BlockTopK, VerticalSlashSpread, VerticalSlashTopK


def test_the_layout_is_the_union_of_both_and_each_budget_widens_it():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 1024, 16, generator=g) * 2, torch.randn(1, 2, 1024, 16, generator=g) * 2
    both = VerticalSlashTopK(vertical_tokens=64, slash_tokens=128, threshold=0.5).block_layout(q, k, 32)
    slash = VerticalSlashSpread(vertical_tokens=64, slash_tokens=128).block_layout(q, k.repeat_interleave(2, 1), 32)
    blocks = BlockTopK(threshold=0.5).block_layout(q, k.repeat_interleave(2, 1), 32)
    assert torch.equal(both, slash | blocks)
    assert (block_density(both) > block_density(slash)).all() and (block_density(both) > block_density(blocks)).all()
    wider = VerticalSlashTopK(vertical_tokens=64, slash_tokens=128, threshold=0.95).block_layout(q, k, 32)
    assert bool((wider | ~both).all()) and block_density(wider).mean() > block_density(both).mean()


def test_the_grid_spans_thresholds_over_the_slash_grid_densest_last():
    grid = VerticalSlashTopK.budget_grid(8192, 64)
    slash = VerticalSlashSpread.budget_grid(8192, 64)
    assert len(grid) == len(VerticalSlashTopK.THRESHOLDS) * len(slash)
    last = grid[-1]
    assert (last.vertical_tokens, last.slash_tokens, last.threshold) == (
        slash[-1].vertical_tokens, slash[-1].slash_tokens, max(VerticalSlashTopK.THRESHOLDS))
    with pytest.raises(ValueError, match="threshold"):
        VerticalSlashTopK(threshold=0.0)


def test_a_patched_model_runs_it_between_its_two_parts():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(1))
    slash = {"vertical_tokens": 32, "slash_tokens": 64}
    variants = {"vertical_slash_spread": slash, "block_topk": {"threshold": 0.5},
                "vertical_slash_topk": {**slash, "threshold": 0.5}}
    sparsity = {}
    with torch.no_grad():
        for name, params in variants.items():
            recipe = Recipe.uniform(model.config, name, block_size=32, **params)
            with patchattn.patched(model, recipe, backend="torch"), record_sparsity() as rec:
                assert torch.isfinite(model(ids).logits).all()
            sparsity[name] = rec.sparsity
    assert sparsity["vertical_slash_topk"] < min(sparsity["vertical_slash_spread"], sparsity["block_topk"]), sparsity
