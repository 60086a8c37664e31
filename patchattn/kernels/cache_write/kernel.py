"""Triton: one decode token into every (row, head) region of a layer's pools, in one launch.

Contract: :func:`patchattn.kernels.cache_write.naive.write_token_naive` (same arguments, same results, in place).

What it replaces: the reference's ~12 small launches a layer (the filling test, the ring slot, three scatters, the
count update, the page counts and limits), which inside a replayed decode graph still cost a few microseconds each
on a small model. One program per (row, KV head) computes its slot, copies the key and value rows (D elements each),
records the position, advances its valid count and writes its page count and limit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...input_device import launches_on_input_device


@triton.jit
def _write_token(
    K, V, KEYS, VALUES, POS, VALID, OFFSETS, SPAN, SINK, RING, WRITTEN, PAD, SLOTS, COUNTS, LIMITS,
    stride_kb, stride_kh, stride_vb, stride_vh, stride_pb, stride_pc, stride_qb, stride_posb, stride_validb, stride_padb,
    n_kv, page, D, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # row * n_kv + head
    b = pid // n_kv
    h = pid % n_kv
    valid = tl.load(VALID + b * stride_validb + h)
    offset = tl.load(OFFSETS + h)
    sink = tl.load(SINK + h)
    ring = tl.load(RING + h)
    token = tl.load(WRITTEN)
    own = token - tl.load(PAD + b * stride_padb)  # the row's own token index (past its padding)
    filling = valid < tl.load(SPAN + h)
    ring_at = sink + (own - sink) % ring  # used only once the ring is full, where own >= sink + ring
    slot = (offset + tl.where(filling, valid, ring_at)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    b64 = b.to(tl.int64)
    k = tl.load(K + b64 * stride_kb + h * stride_kh + d, mask=in_d)
    v = tl.load(V + b64 * stride_vb + h * stride_vh + d, mask=in_d)
    tl.store(KEYS + b64 * stride_pb + slot * stride_pc + d, k, mask=in_d)
    tl.store(VALUES + b64 * stride_qb + slot * stride_pc + d, v, mask=in_d)
    tl.store(POS + b64 * stride_posb + slot, token)
    new_valid = valid + filling.to(tl.int32)
    tl.store(VALID + b * stride_validb + h, new_valid)
    tl.store(SLOTS + pid, slot)
    tl.store(COUNTS + pid, (new_valid + page - 1) // page)
    tl.store(LIMITS + pid, offset + new_valid)


def unsupported_reason(key, keys) -> str | None:
    """Why the kernel does not take these inputs (None: it does)."""
    if not key.is_cuda and not _interpreted():
        return "not on a CUDA device"
    if key.stride(-1) != 1 or keys.stride(-1) != 1:
        return "the head dimension is not contiguous"
    if keys.shape[1] * keys.stride(1) >= 2**31:
        return "a pool row longer than 2^31 elements"
    return None


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@launches_on_input_device
def write_token_triton(key, value, keys, values, positions, valid, offsets, span, sink, ring, written, pad, page: int):
    batch, n_kv, dim = key.shape
    slots = torch.empty(batch, n_kv, dtype=torch.int64, device=key.device)
    counts = torch.empty(batch, n_kv, dtype=torch.int32, device=key.device)
    limits = torch.empty_like(counts)
    _write_token[(batch * n_kv,)](
        key, value, keys, values, positions, valid, offsets, span, sink, ring, written, pad, slots, counts, limits,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), keys.stride(0), keys.stride(1), values.stride(0),
        positions.stride(0), valid.stride(0), pad.stride(0),
        n_kv, page, dim, BLOCK_D=triton.next_power_of_2(dim),
    )
    return slots, counts, limits
