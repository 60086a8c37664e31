"""The Triton Quest bound (each candidate page's extremes read once, the group's largest bound per page) against its
PyTorch reference; on a machine without CUDA through Triton's interpreter."""

from __future__ import annotations

import importlib

import pytest
import torch
from triton_harness import DEVICE, ON_GPU, gpu, is_interpreted, needs_cuda, rerun_interpreted, runs_kernel_mark  # noqa: F401 (first: sets TRITON_INTERPRET)

triton = pytest.importorskip("triton")

from patchattn.kernels.quest_bound import quest_bounds_naive  # noqa: E402

kernel = importlib.import_module("patchattn.kernels.quest_bound.kernel")
runs_kernel = runs_kernel_mark(is_interpreted(kernel._quest_bounds))


def case(batch, heads, group, dim, pool_pages, n_cand, seed, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, group, dim, generator=gen).to(dtype)
    lo = torch.randn(batch, pool_pages, dim, generator=gen)
    hi = lo + torch.rand(batch, pool_pages, dim, generator=gen)
    starts = torch.randint(0, pool_pages - n_cand + 1, (heads,), generator=gen)
    candidates = starts[:, None] + torch.arange(n_cand)  # each head's own run of pool pages
    move = lambda *ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    return move(query, lo.to(dtype), hi.to(dtype), candidates)


@runs_kernel
@pytest.mark.parametrize("batch,heads,group,dim,pool,n_cand", [(1, 2, 4, 64, 40, 33), (2, 3, 1, 96, 20, 7), (1, 1, 3, 128, 64, 64)])
def test_kernel_matches_reference(batch, heads, group, dim, pool, n_cand):
    args = case(batch, heads, group, dim, pool, n_cand, seed=batch + heads + dim)
    ref = quest_bounds_naive(*args)
    out = kernel.quest_bounds_triton(*args)
    assert out.shape == ref.shape == (batch, heads, n_cand) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(ON_GPU or is_interpreted(kernel._quest_bounds), reason="the kernel tests run in this process")
def test_kernel_in_interpreter_subprocess():
    rerun_interpreted(__file__, "matches_reference", 300)
