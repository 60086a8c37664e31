"""The Triton vertical-slash estimate against its float32 PyTorch reference.

On a machine without CUDA the kernel runs through Triton's interpreter at small shapes. Fresh random queries and keys
(GQA and not, lengths that are and are not block multiples, fewer queries than the 64 of the strategy), outputs
checked to relative error < 1e-2 (the kernel's dot runs in the inputs' precision), and the mass must add up: every
query's probabilities sum to one, so both scores sum to the number of queries.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from triton_harness import DEVICE, ON_GPU, gpu, is_interpreted, needs_cuda, rel_err, rerun_interpreted, runs_kernel_mark  # noqa: F401 (first: sets TRITON_INTERPRET)

triton = pytest.importorskip("triton")

from patchattn.strategies.vs_estimate.naive import vertical_slash_scores_naive  # noqa: E402
from patchattn.layout import num_blocks  # noqa: E402

kernel = importlib.import_module("patchattn.strategies.vs_estimate.kernel")
INTERPRETED = is_interpreted(kernel._vs_scores)
runs_kernel = runs_kernel_mark(INTERPRETED)


def check(batch, heads, kv_heads, n, last, dim, block_size, dtype, seed, programs=None, monkeypatch=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, last, dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen).to(DEVICE, dtype)
    nb = num_blocks(n, block_size)
    scale = 1.0 / math.sqrt(dim)
    ref_v, ref_s, ref_c = vertical_slash_scores_naive(q.float(), k.float(), scale, block_size, nb, columns=True)
    if programs is not None:
        monkeypatch.setattr(kernel, "TARGET_PROGRAMS", programs)
    vert, slash = kernel.vertical_slash_scores_triton(q, k, scale, block_size, nb)
    assert vert.shape == slash.shape == (batch, heads, nb) and vert.dtype == torch.float32
    assert rel_err(vert, ref_v) < 1e-2 and rel_err(slash, ref_s) < 1e-2, (rel_err(vert, ref_v), rel_err(slash, ref_s))
    # with every key position's score too (token-granular verticals); poisoned first, so unwritten columns show
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    vert2, slash2, column = kernel.vertical_slash_scores_triton(q, k, scale, block_size, nb, columns=True)
    monkeypatch.undo()
    assert column.shape == (batch, heads, n) and torch.isfinite(column).all()
    assert rel_err(column, ref_c) < 1e-2, rel_err(column, ref_c)
    assert rel_err(vert2, ref_v) < 1e-2 and rel_err(slash2, ref_s) < 1e-2
    for scores in (vert, slash):
        torch.testing.assert_close(scores.sum(-1), torch.full((batch, heads), float(last), device=DEVICE), rtol=1e-3, atol=1e-3)


def _poisoned(empty):
    """``torch.empty`` whose float32 tensors come back full of NaN (so a kernel that skips a write is caught)."""

    def make(*args, **kwargs):
        out = empty(*args, **kwargs)
        if out.dtype == torch.float32:
            out.fill_(float("nan"))
        return out

    return make


@runs_kernel
@pytest.mark.parametrize(
    "batch,heads,kv_heads,n,last,block_size",
    [(1, 2, 1, 200, 16, 16), (2, 4, 2, 96, 32, 32), (1, 3, 3, 130, 20, 16), (1, 2, 2, 64, 64, 32)],
)
def test_kernel_matches_reference(batch, heads, kv_heads, n, last, block_size, monkeypatch):
    # few programs per head too: chunks of several tiles, merged on the host
    check(batch, heads, kv_heads, n, last, 16, block_size, torch.float32, seed=n + last, programs=4, monkeypatch=monkeypatch)


@gpu
@needs_cuda
@pytest.mark.parametrize("n,block_size,dim", [(8192, 64, 64), (32768, 128, 128), (5000, 64, 128)])
def test_kernel_matches_reference_real_shapes(n, block_size, dim, monkeypatch):
    check(1, 8, 2, n, 64, dim, block_size, torch.bfloat16, seed=n, monkeypatch=monkeypatch)


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the kernel tests run in this process")
def test_kernel_in_interpreter_subprocess():
    """Triton was imported before the interpreter could be switched on: run this file's kernel tests anew."""
    rerun_interpreted(__file__, "kernel_matches_reference and not real_shapes", timeout_s=600)


def test_unsupported_shapes_are_named_and_the_dispatch_falls_back():
    """Head dims that are not powers of two (Phi-3-mini: 96) are refused by the kernel with a reason, and the
    dispatcher then runs the reference (here on the CPU: always the reference)."""
    from patchattn.strategies.vs_estimate import vertical_slash_scores

    q = torch.randn(1, 2, 8, 96)
    k = torch.randn(1, 1, 64, 96)
    assert "head dim 96" in kernel.unsupported_reason(q, k, 16)
    assert kernel.unsupported_reason(q[..., :64], k[..., :64], 48) is not None
    with pytest.raises(ValueError, match="head dim 96"):
        kernel.vertical_slash_scores_triton(q, k, 0.1, 16, 4)
    vert, slash = vertical_slash_scores(q, k, 0.1, 16, 4)
    ref = vertical_slash_scores_naive(q, k, 0.1, 16, 4)
    assert torch.equal(vert, ref[0]) and torch.equal(slash, ref[1])


@runs_kernel
@pytest.mark.parametrize("n_q,n_keys,windows", [(200, 200, 4), (96, 160, 8), (40, 40, 8)])
def test_spread_kernel_matches_reference(n_q, n_keys, windows, monkeypatch):
    """The spread estimate (windows of queries through the prompt, or through a chunk's queries) composed of the
    kernel's one-window estimates equals its one-softmax reference."""
    import patchattn.strategies.vs_estimate as vs
    from patchattn.strategies.vs_estimate.spread import spread_scores_naive, spread_vertical_slash_scores

    gen = torch.Generator().manual_seed(n_q + windows)
    q = torch.randn(1, 4, n_q, 16, generator=gen).to(DEVICE)
    k = torch.randn(1, 2, n_keys, 16, generator=gen).to(DEVICE)
    nb = num_blocks(n_keys, 16)
    monkeypatch.setattr(vs, "vertical_slash_scores", kernel.vertical_slash_scores_triton)
    got = spread_vertical_slash_scores(q, k, 0.25, 16, nb, windows, 16, columns=True)
    ref = spread_scores_naive(q.float(), k.float(), 0.25, 16, nb, windows, 16, columns=True)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-2, rel_err(a, b)
