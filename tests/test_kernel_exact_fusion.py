"""The eager-exact norm and gated-activation kernels against their references (eager PyTorch's arithmetic): equal bit
for bit on a GPU, where the admission check of decode_fusion relies on it; within an ulp in Triton's interpreter, whose
``rsqrt`` and ``exp`` are NumPy's."""

from __future__ import annotations

import importlib

import pytest
import torch
from triton_harness import DEVICE, ON_GPU, is_interpreted, rerun_interpreted, runs_kernel_mark  # noqa: F401 (first: sets TRITON_INTERPRET)

triton = pytest.importorskip("triton")

from patchattn.kernels.exact_fusion import rms_tail_naive, silu_mul_naive, squares_naive  # noqa: E402

kernel = importlib.import_module("patchattn.kernels.exact_fusion.kernel")
runs_kernel = runs_kernel_mark(is_interpreted(kernel._rms_tail))


def same(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal on a GPU; in the interpreter within one unit in the last place of the output's dtype."""
    if ON_GPU:
        return out.dtype == ref.dtype and torch.equal(out, ref)
    tol = torch.finfo(ref.dtype).eps * 2
    return out.dtype == ref.dtype and torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol)


@runs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 1, 2048), (2, 5, 96)])
def test_norm_matches_reference(dtype, plus_one, shape):
    gen = torch.Generator().manual_seed(shape[-1] + plus_one)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE)
    weight = (torch.randn(shape[-1], generator=gen) * 0.1 + 1).to(dtype).to(DEVICE)
    squares = kernel.squares_triton(x)
    assert torch.equal(squares, squares_naive(x))  # a square is exact in float32 on both
    variance = squares.mean(-1, keepdim=True)
    assert same(kernel.rms_tail_triton(x, variance, weight, 1e-6, plus_one), rms_tail_naive(x, variance, weight, 1e-6, plus_one))


@runs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [7, 1536, 4097])
def test_silu_mul_matches_reference(dtype, n):
    gen = torch.Generator().manual_seed(n)
    gate = (torch.randn(2, 1, n, generator=gen) * 4).to(dtype).to(DEVICE)
    up = torch.randn(2, 1, n, generator=gen).to(dtype).to(DEVICE)
    assert same(kernel.silu_mul_triton(gate, up), silu_mul_naive(gate, up))


@pytest.mark.skipif(ON_GPU or is_interpreted(kernel._rms_tail), reason="the kernel tests run in this process")
def test_kernel_in_interpreter_subprocess():
    rerun_interpreted(__file__, "matches_reference", 300)
