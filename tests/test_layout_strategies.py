"""Layouts and strategies: ragged form round-trips; every strategy's layout is causal, keeps the diagonal,
and its reference attention equals a dense attention masked with the same layout."""

import pytest
import torch

from patchattn.kernels.sparse_prefill.naive import sparse_prefill_naive
from patchattn.layout import block_density, causal_blocks, finalize, from_indices, num_blocks, to_indices, token_mask
from patchattn.strategies import STRATEGIES, get_strategy


def test_indices_round_trip():
    g = torch.Generator().manual_seed(1)
    keep = finalize(torch.rand(2, 3, 11, 11, generator=g) > 0.5)
    counts, ids = to_indices(keep)
    assert counts.dtype == torch.int32 and ids.dtype == torch.int32
    assert torch.equal(from_indices(counts, ids, 11), keep)
    for b, h, i in [(0, 0, 10), (1, 2, 5)]:
        valid = ids[b, h, i, : counts[b, h, i]]
        assert torch.equal(valid, torch.nonzero(keep[b, h, i]).flatten().int())


def test_density_counts_causal_blocks():
    keep = causal_blocks(8)[None, None]
    assert block_density(keep).item() == pytest.approx(1.0)
    diag = finalize(torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    assert block_density(diag).item() == pytest.approx((7 + 8) / 36)  # diagonal + the dense last row


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_layout_is_causal_with_diagonal(name):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 333, 16, generator=g), torch.randn(2, 3, 333, 16, generator=g)
    n_blk = num_blocks(333, 32)
    for strat in STRATEGIES[name].budget_grid(333, 32):
        keep = strat.block_layout(q, k, 32)
        assert keep.shape == (2, 3, n_blk, n_blk) and keep.dtype == torch.bool
        assert not (keep & ~causal_blocks(n_blk)).any(), "layout reads a future block"
        assert keep.diagonal(dim1=-2, dim2=-1).all(), "diagonal block missing"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("n_tokens,block_size,group", [(300, 32, 2), (256, 64, 1), (97, 16, 4)])
def test_reference_equals_masked_dense(name, n_tokens, block_size, group):
    g = torch.Generator().manual_seed(3)
    hkv = 2
    q = torch.randn(1, hkv * group, n_tokens, 16, generator=g) * 2
    k = torch.randn(1, hkv, n_tokens, 16, generator=g) * 2
    v = torch.randn(1, hkv, n_tokens, 16, generator=g)
    strat = STRATEGIES[name].budget_grid(n_tokens, block_size)[0]  # the sparsest budget
    keep = strat.block_layout(q, k.repeat_interleave(group, 1), block_size)
    counts, ids = to_indices(keep)
    out = sparse_prefill_naive(q, k, v, counts, ids, block_size)
    mask = token_mask(keep, n_tokens, n_tokens, block_size)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double(), attn_mask=mask
    )
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, f"{name}: relative error {rel:.2e}"
    if name != "dense" and num_blocks(n_tokens, block_size) >= 8:
        assert block_density(keep).mean() < 0.9, "the sparsest budget should skip blocks"


def test_reference_applies_model_mask():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 100, 8, generator=g) for _ in range(3))
    keep = finalize(torch.ones(1, 2, 4, 4, dtype=torch.bool))
    counts, ids = to_indices(keep)
    window = torch.ones(100, 100, dtype=torch.bool).tril() & ~torch.ones(100, 100, dtype=torch.bool).tril(-20)
    out = sparse_prefill_naive(q, k, v, counts, ids, 32, attn_mask=window[None, None])
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=window)
    assert torch.allclose(out, ref, atol=1e-5)


def test_budgets_order_density():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 512, 16, generator=g), torch.randn(1, 2, 512, 16, generator=g)
    for name in ("streaming", "block_topk"):
        dens = [block_density(s.block_layout(q, k, 32)).mean().item() for s in STRATEGIES[name].budget_grid(512, 32)]
        assert dens == sorted(dens), f"{name} budgets should grow denser: {dens}"


def test_unknown_strategy_and_bad_params():
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        get_strategy("streaming", width=3)
    with pytest.raises(ValueError):
        get_strategy("block_topk", threshold=1.5)


def _mixed_budgets(name, n_tokens, block_size, heads):
    """One budget per head from the strategy's grid (repeats included), densest and sparsest among them."""
    grid = STRATEGIES[name].budget_grid(n_tokens, block_size)
    return [grid[(i * 5) % len(grid)] for i in range(heads)]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_per_head_budgets_in_one_pass_equal_each_head_alone(name):
    """layout_heads (one estimate, per-head budgets as tensors) keeps exactly what each head's own strategy
    keeps when run alone; the keys may come unexpanded (GQA) or expanded to the query heads."""
    g = torch.Generator().manual_seed(5)
    heads, kv_heads, n, bs = 6, 2, 400, 32
    q = torch.randn(2, heads, n, 16, generator=g)
    k = torch.randn(2, kv_heads, n, 16, generator=g)
    k_full = k.repeat_interleave(heads // kv_heads, dim=1)
    budgets = _mixed_budgets(name, n, bs, heads)
    cls = STRATEGIES[name]
    grouped = cls.layout_heads(budgets[0].estimate(q, k, bs), budgets)
    expanded = cls.layout_heads(budgets[0].estimate(q, k_full, bs), budgets)
    assert torch.equal(finalize(grouped), finalize(expanded))
    for h, strat in enumerate(budgets):
        alone = strat.block_layout(q[:, h : h + 1], k_full[:, h : h + 1], bs)
        assert torch.equal(finalize(grouped)[:, h : h + 1], alone), f"head {h} ({strat})"


@pytest.mark.parametrize("n_tokens,block_size", [(96, 32), (200, 32), (256, 32), (256, 16), (300, 64)])
def test_no_budget_computes_more_than_dense_at_short_lengths(n_tokens, block_size):
    """Every budget of every strategy scores a density in [0, 1] at short lengths, whose early query blocks hold most
    of their few causal blocks through the sink and the diagonals; with token columns, no query block computes more
    blocks plus column tiles (what the kernels gather) than its causal blocks, and the calibration's order (finish,
    then add the columns) and the prefill's (add the columns, then finish) agree."""
    from patchattn.calibrate.scoring import sample_rows, score_layer
    from patchattn.layout import column_reads, column_tiles

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 4, n_tokens, 16, generator=g) * 2 for _ in range(3))
    rows = sample_rows(n_tokens, 32, block_size, g)
    causal_per_row = torch.arange(1, num_blocks(n_tokens, block_size) + 1)
    for name in sorted(STRATEGIES):
        grid = STRATEGIES[name].budget_grid(n_tokens, block_size)
        for dense_rows in (0, 2):
            scores = score_layer(q, k, v, grid, block_size, rows, dense_rows=dense_rows)
            assert ((scores.density >= 0) & (scores.density <= 1)).all(), f"{name}: {scores.density.max()}"
            assert (scores.kept_mass <= 1 + 1e-5).all()
            for cand in grid:
                est = cand.estimate(q, k, block_size)
                cols = cand.columns(est)
                if cols is None:
                    continue
                keep, counts = column_reads(finalize(cand.layout(est), dense_rows), cols, block_size, dense_rows)
                raw_keep, raw_counts = column_reads(cand.layout(est), cols, block_size, dense_rows)
                assert torch.equal(finalize(raw_keep, dense_rows), keep) and torch.equal(raw_counts, counts)
                assert (keep.sum(-1) + column_tiles(counts, block_size) <= causal_per_row).all(), cand


def test_to_ragged_reports_density():
    from patchattn.layout import to_ragged

    keep = finalize(torch.zeros(1, 2, 8, 8, dtype=torch.bool))
    counts, ids, density = to_ragged(keep)
    assert torch.equal(counts, keep.sum(-1, dtype=torch.int32)) and ids.shape[-1] == 8
    assert density == pytest.approx(block_density(keep).mean().item())


def test_default_per_head_layout_runs_each_budget_on_its_heads():
    """A strategy without a vectorized layout_heads (the base class's default) still gives head i its own budget."""
    from patchattn.strategies.base import Strategy
    from patchattn.strategies.streaming import Streaming

    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 4, 256, 16, generator=g), torch.randn(1, 4, 256, 16, generator=g)
    budgets = [Streaming(32, 32), Streaming(0, 128), Streaming(32, 32), Streaming(64, 64)]
    est = budgets[0].estimate(q, k, 32)
    default = Strategy.layout_heads.__func__(Streaming, est, budgets)  # the base implementation, not the override
    assert torch.equal(finalize(default), finalize(Streaming.layout_heads(est, budgets)))
    for h, s in enumerate(budgets):
        assert torch.equal(finalize(default)[:, h], s.block_layout(q[:, h:h + 1], k[:, h:h + 1], 32)[:, 0])
