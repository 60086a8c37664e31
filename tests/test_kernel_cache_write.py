"""The Triton decode-token write (one launch: slot, key/value rows, position, valid count, page count and limit per
row and KV head) against its PyTorch reference; on a machine without CUDA through Triton's interpreter."""

from __future__ import annotations

import importlib

import pytest
import torch
from triton_harness import DEVICE, ON_GPU, gpu, is_interpreted, needs_cuda, rerun_interpreted, runs_kernel_mark  # noqa: F401 (first: sets TRITON_INTERPRET)

triton = pytest.importorskip("triton")

from patchattn.kernels.cache_write import write_token_naive  # noqa: E402

kernel = importlib.import_module("patchattn.kernels.cache_write.kernel")
runs_kernel = runs_kernel_mark(is_interpreted(kernel._write_token))
NEVER_FULL = torch.iinfo(torch.int32).max


def case(batch: int, dim: int, seed: int, dtype=torch.float16):
    """Four KV heads: a growing head (full / SnapKV), a ring head still filling, a full ring head, another growing
    one; the second row left-padded by 5 tokens."""
    gen = torch.Generator().manual_seed(seed)
    caps = [48, 24, 24, 32]
    offsets = torch.tensor([0, 48, 72, 96], dtype=torch.int32)
    span = torch.tensor([NEVER_FULL, 20, 20, NEVER_FULL], dtype=torch.int32)
    sink = torch.tensor([0, 4, 4, 0], dtype=torch.int32)
    ring = torch.tensor([1, 16, 16, 1], dtype=torch.int32)
    valid = torch.tensor([[30, 11, 20, 17]] * batch, dtype=torch.int32)
    if batch > 1:
        valid[1] = torch.tensor([25, 9, 20, 12])
    total = sum(caps)
    state = dict(
        keys=torch.randn(batch, total, dim, generator=gen).to(dtype),
        values=torch.randn(batch, total, dim, generator=gen).to(dtype),
        positions=torch.randint(0, 100, (batch, total), generator=gen, dtype=torch.int32),
        valid=valid,
    )
    pad = torch.tensor([[0], [5]][:batch], dtype=torch.int32)
    token = dict(key=torch.randn(batch, 4, dim, generator=gen).to(dtype), value=torch.randn(batch, 4, dim, generator=gen).to(dtype))
    fixed = dict(offsets=offsets, span=span, sink=sink, ring=ring, written=torch.tensor(57, dtype=torch.int32), pad=pad)
    move = lambda d: {k: v.to(DEVICE) for k, v in d.items()}  # noqa: E731
    return move(state), move(token), move(fixed)


def run(fn, state, token, fixed, page=16):
    s = {k: v.clone() for k, v in state.items()}
    out = fn(token["key"], token["value"], s["keys"], s["values"], s["positions"], s["valid"], fixed["offsets"],
             fixed["span"], fixed["sink"], fixed["ring"], fixed["written"], fixed["pad"], page)
    return s, out


@runs_kernel
@pytest.mark.parametrize("batch,dim", [(1, 64), (2, 64), (2, 96)])
def test_kernel_matches_reference(batch, dim):
    state, token, fixed = case(batch, dim, seed=batch * 10 + dim)
    ref_state, (ref_slots, ref_counts, ref_limits) = run(write_token_naive, state, token, fixed)
    out_state, (slots, counts, limits) = run(kernel.write_token_triton, state, token, fixed)
    for name in ref_state:
        assert torch.equal(out_state[name], ref_state[name]), name
    assert torch.equal(slots, ref_slots) and torch.equal(counts, ref_counts) and torch.equal(limits, ref_limits)
    # the full ring head wrote at its ring slot, the filling ones at their counts, and only the filling ones grew
    assert ref_slots[0].tolist() == [30, 48 + 11, 72 + 4 + (57 - 4) % 16, 96 + 17]
    assert ref_state["valid"][0].tolist() == [31, 12, 20, 18]
    if batch > 1:  # the padded row's ring slot counts its own tokens
        assert int(ref_slots[1, 2]) == 72 + 4 + (52 - 4) % 16


@runs_kernel
def test_a_strided_token_is_read_where_it_lies():
    """The decode step passes the token as a slice of the step's (B, Hkv, n, D) keys: not contiguous over heads."""
    state, token, fixed = case(2, 64, seed=3)
    wide = {k: torch.stack([v, v * 2], dim=2)[:, :, 0] for k, v in token.items()}  # (B, Hkv, D) with a row stride of 2D
    assert not wide["key"].is_contiguous()
    ref = run(write_token_naive, state, token, fixed)
    out = run(kernel.write_token_triton, state, wide, fixed)
    assert all(torch.equal(out[0][k], ref[0][k]) for k in ref[0]) and torch.equal(out[1][0], ref[1][0])


@pytest.mark.skipif(ON_GPU or is_interpreted(kernel._write_token), reason="the kernel tests run in this process")
def test_kernel_in_interpreter_subprocess():
    rerun_interpreted(__file__, "matches_reference or strided", 300)
