"""The Triton layout finisher (finalize + compaction to counts and ids in one launch) against its PyTorch reference.

On a machine without CUDA the kernel runs through Triton's interpreter at small shapes. Each check draws a fresh
random raw layout (dense-ish, sparse, empty, banded, broadcast views), poisons the output buffers, and requires the
counts, the ids (padding included) and the density to equal the reference exactly.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from triton_harness import DEVICE, ON_GPU, gpu, is_interpreted, needs_cuda, rerun_interpreted, runs_kernel_mark  # noqa: F401 (first: sets TRITON_INTERPRET)

triton = pytest.importorskip("triton")

from patchattn.kernels import finalize_ragged  # noqa: E402
from patchattn.kernels.ragged.naive import finalize_ragged_naive  # noqa: E402
from patchattn.layout import from_indices  # noqa: E402

kernel = importlib.import_module("patchattn.kernels.ragged.kernel")
INTERPRETED = is_interpreted(kernel._finalize_ragged)
runs_kernel = runs_kernel_mark(INTERPRETED)


def raw_layout(kind: str, batch: int, heads: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.rand(batch, heads, n, n, generator=gen) < torch.rand(batch, heads, 1, 1, generator=gen)
    if kind == "empty":
        return torch.zeros(batch, heads, n, n, dtype=torch.bool)
    if kind == "full":  # the future half too: the finisher must clip it
        return torch.ones(batch, heads, n, n, dtype=torch.bool)
    if kind == "band":  # a broadcast view, as streaming layouts are (stride 0 over batch and heads)
        idx = torch.arange(n)
        return ((idx[:, None] - idx[None, :]).abs() <= 2).expand(batch, heads, n, n)
    raise ValueError(kind)


def check(kind, batch, heads, n, seed, dense_rows=0, window_rows=0):
    gen = torch.Generator().manual_seed(seed)
    keep = raw_layout(kind, batch, heads, n, gen).to(DEVICE)
    ref_counts, ref_ids, ref_density = finalize_ragged_naive(keep, dense_rows, window_rows)
    if window_rows:
        assert int(ref_counts.max()) <= window_rows, "a row reaches past the window"
    counts = torch.full((batch, heads, n), -7, dtype=torch.int32, device=DEVICE)
    ids = torch.full((batch, heads, n, n), -7, dtype=torch.int32, device=DEVICE)
    out_counts, out_ids, density = kernel.finalize_ragged_triton(keep, out=(counts, ids), dense_rows=dense_rows, window_rows=window_rows)
    assert torch.equal(out_counts, ref_counts)
    assert out_ids.shape == ref_ids.shape and torch.equal(out_ids, ref_ids)
    assert (ids[..., out_ids.shape[-1]:] == 0).all(), "padding past the longest row must be zeros, not poison"
    assert density == pytest.approx(ref_density, rel=1e-12)
    assert torch.equal(from_indices(out_counts.cpu(), out_ids.cpu(), n), from_indices(ref_counts.cpu(), ref_ids.cpu(), n))


@runs_kernel
@pytest.mark.parametrize("kind", ["random", "empty", "full", "band"])
@pytest.mark.parametrize("batch,heads,n", [(1, 3, 7), (2, 2, 16), (1, 1, 33)])
def test_kernel_matches_reference(kind, batch, heads, n):
    check(kind, batch, heads, n, seed=batch * 100 + n)
    check(kind, batch, heads, n, seed=batch * 100 + n, dense_rows=n // 3)  # a recipe's dense prefix
    check(kind, batch, heads, n, seed=batch * 100 + n, dense_rows=n // 3, window_rows=3)  # a model's sliding window


@runs_kernel
def test_dispatch_picks_the_reference_for_torch_backend():
    keep = raw_layout("random", 1, 2, 9, torch.Generator().manual_seed(3)).to(DEVICE)
    a = finalize_ragged(keep, "torch")
    b = finalize_ragged_naive(keep)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    with pytest.raises(ValueError, match="unknown backend"):
        finalize_ragged(keep, "cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [64, 1000, 2048])
def test_kernel_matches_reference_real_sizes(n):
    check("random", 1, 8, n, seed=n)


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the kernel tests run in this process")
def test_kernel_in_interpreter_subprocess():
    """Triton was imported before the interpreter could be switched on: run this file's kernel tests anew."""
    rerun_interpreted(__file__, "matches_reference or dispatch", timeout_s=600)
