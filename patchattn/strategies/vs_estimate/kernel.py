"""Triton: the vertical-slash estimate in two passes over the keys, never holding the (L x N) probabilities.

Contract (identical to :func:`patchattn.strategies.vs_estimate.naive.vertical_slash_scores_naive`, up to float
summation order):

    vertical_slash_scores_triton(q_last, k, scale, block_size, n_blocks) -> (vertical, slash)  # (B, H, n_blocks) fp32
    vertical_slash_scores_triton(..., columns=True) -> (vertical, slash, column)  # column: (B, H, N) fp32

Programs own (batch, query head, chunk of key tiles), a tile being one layout block of keys (``block_size``), heads
fastest so the query heads of a KV head read its keys side by side (L2). Pass 1 computes each query row's running
max and sum of exponentials over its chunk (flash-attention statistics); the host merges the chunks (a logsumexp
over a (B, H, chunks, L) tensor). Pass 2 recomputes the scores, normalises them, stores each tile's column sum as
that key block's vertical score, and adds each tile's mass per block of offsets ``query - key`` (at most
``L // block_size + 2`` blocks per tile) into the slash scores with atomics. The reference builds the full
(B, H, L, N) float32 probability matrix plus an equally large gather: ~6 passes over 1 GB per layer at 128K tokens.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...input_device import launches_on_input_device

LOG2E = 1.4426950408889634
TARGET_PROGRAMS = 1024  # chunks per (batch, head) are sized to give about this many programs


@triton.jit
def _scores(q, K, kv_row0, start, offs_n, offs_d, n_keys, stride_kn, q_pos, qk_scale):
    """(BLOCK_L, BLOCK_N) scores of the tile starting at key ``start`` in log2 units, causal and tail masked."""
    cols = start + offs_n
    k = tl.load(K + (kv_row0 + cols)[:, None] * stride_kn + offs_d[None, :], mask=(cols < n_keys)[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    allowed = (cols[None, :] <= q_pos[:, None]) & (cols < n_keys)[None, :]
    return tl.where(allowed, s, -float("inf")), cols


@triton.jit
def _program_queries(Q, K, bh, n_heads, kv_group, n_last, n_keys, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh,
                     BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's last queries (padded rows zero), their positions, its KV head's key pointer, and the offsets."""
    offs_l = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b = bh // n_heads
    h = bh % n_heads
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_l[:, None] * stride_ql + offs_d[None, :],
                mask=(offs_l < n_last)[:, None], other=0.0)
    kv_base = K + b.to(tl.int64) * stride_kb + (h // kv_group).to(tl.int64) * stride_kh
    return q, n_keys - n_last + offs_l, kv_base, offs_l, offs_n, offs_d


@triton.jit
def _vs_stats(
    Q, K, M, L,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kn,
    n_heads, kv_group, n_last, n_keys, tiles_per_chunk, n_chunks, qk_scale,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    bh, chunk = tl.program_id(0), tl.program_id(1)
    q, q_pos, kv_base, offs_l, offs_n, offs_d = _program_queries(
        Q, K, bh, n_heads, kv_group, n_last, n_keys, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, BLOCK_L, BLOCK_N, HEAD_DIM)
    m = tl.full([BLOCK_L], -float("inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_L], tl.float32)
    for t in range(chunk * tiles_per_chunk, tl.minimum((chunk + 1) * tiles_per_chunk, tl.cdiv(n_keys, BLOCK_N))):
        s, cols = _scores(q, kv_base, 0, t * BLOCK_N, offs_n, offs_d, n_keys, stride_kn, q_pos, qk_scale)
        m_new = tl.maximum(m, tl.max(s, 1))
        safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s_sum = s_sum * tl.math.exp2(m - safe) + tl.sum(tl.math.exp2(s - safe[:, None]), 1)
        m = m_new
    out = (bh * n_chunks + chunk) * BLOCK_L + offs_l
    tl.store(M + out, m)
    tl.store(L + out, s_sum)


@triton.jit
def _vs_scores(
    Q, K, M, L, VERT, SLASH, COLS,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kn,
    n_heads, kv_group, n_last, n_keys, n_blocks, tiles_per_chunk, qk_scale,
    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, N_OFFSET_BLOCKS: tl.constexpr,
    STORE_COLUMNS: tl.constexpr,
):
    bh, chunk = tl.program_id(0), tl.program_id(1)
    q, q_pos, kv_base, offs_l, offs_n, offs_d = _program_queries(
        Q, K, bh, n_heads, kv_group, n_last, n_keys, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, BLOCK_L, BLOCK_N, HEAD_DIM)
    m = tl.load(M + bh * BLOCK_L + offs_l)
    inv = 1.0 / tl.load(L + bh * BLOCK_L + offs_l)
    m = tl.where(offs_l < n_last, m, 0.0)
    inv = tl.where(offs_l < n_last, inv, 0.0)
    for t in range(chunk * tiles_per_chunk, tl.minimum((chunk + 1) * tiles_per_chunk, n_blocks)):
        s, cols = _scores(q, kv_base, 0, t * BLOCK_N, offs_n, offs_d, n_keys, stride_kn, q_pos, qk_scale)
        p = tl.math.exp2(s - m[:, None]) * inv[:, None]  # masked scores give 0
        column = tl.sum(p, 0)
        tl.store(VERT + bh * n_blocks + t, tl.sum(column, 0))
        if STORE_COLUMNS:
            tl.store(COLS + bh.to(tl.int64) * n_keys + cols, column, mask=cols < n_keys)
        offset_block = (q_pos[:, None] - cols[None, :]) // BLOCK_N  # offsets < 0 only where p == 0
        first = (n_keys - n_last - (t * BLOCK_N + BLOCK_N - 1)) // BLOCK_N
        for j in tl.static_range(N_OFFSET_BLOCKS):
            target = first + j
            mass = tl.sum(tl.sum(tl.where(offset_block == target, p, 0.0), 1), 0)
            ok = (target >= 0) & (target < n_blocks)
            tl.atomic_add(SLASH + bh * n_blocks + tl.where(ok, target, 0), mass, mask=ok)


def unsupported_reason(q_last: torch.Tensor, k: torch.Tensor, block_size: int) -> str | None:
    """Why the kernel cannot take these inputs, or None if it can."""
    dim = q_last.shape[-1]
    if q_last.shape[1] % k.shape[1] or k.shape[-1] != dim:
        return "query heads must be a multiple of key heads, with one head dim"
    if dim not in (16, 32, 64, 128, 256):
        return f"head dim {dim} (the kernel takes powers of two from 16 to 256)"
    if block_size not in (16, 32, 64, 128, 256):
        return f"block size {block_size} (the kernel takes powers of two from 16 to 256)"
    return None


@launches_on_input_device
def vertical_slash_scores_triton(q_last: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, n_blocks: int,
                                 columns: bool = False):
    batch, heads, n_last, dim = q_last.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    reason = unsupported_reason(q_last, k, block_size)
    if reason is not None:
        raise ValueError(f"vertical-slash estimate kernel: unsupported input: {reason}")
    if triton.cdiv(n_keys, block_size) != n_blocks:
        raise ValueError(f"{n_keys} keys are not {n_blocks} blocks of {block_size}")
    if q_last.stride(-1) != 1:
        q_last = q_last.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if k.dtype != q_last.dtype:
        k = k.to(q_last.dtype)
    block_l = max(16, triton.next_power_of_2(n_last))
    tiles_per_chunk = triton.cdiv(n_blocks, max(1, min(n_blocks, TARGET_PROGRAMS // max(1, batch * heads))))
    n_chunks = triton.cdiv(n_blocks, tiles_per_chunk)
    dev = q_last.device
    m = torch.empty(batch * heads, n_chunks, block_l, dtype=torch.float32, device=dev)
    s_sum = torch.empty_like(m)
    qk_scale = float(scale) * LOG2E
    strides = (q_last.stride(0), q_last.stride(1), q_last.stride(2), k.stride(0), k.stride(1), k.stride(2))
    grid = (batch * heads, n_chunks)
    common = dict(BLOCK_L=block_l, BLOCK_N=block_size, HEAD_DIM=dim, num_warps=4)
    _vs_stats[grid](q_last, k, m, s_sum, *strides, heads, heads // kv_heads, n_last, n_keys, tiles_per_chunk, n_chunks,
                    qk_scale, **common)
    # Merge the chunks' statistics per query row (logsumexp in base 2).
    m_all = m.amax(1)  # (B*H, BLOCK_L)
    l_all = (s_sum * torch.exp2(m - m_all[:, None]).nan_to_num_(0.0)).sum(1)
    vertical = torch.empty(batch, heads, n_blocks, dtype=torch.float32, device=dev)
    slash = torch.zeros(batch, heads, n_blocks, dtype=torch.float32, device=dev)
    column = torch.empty(batch, heads, n_keys, dtype=torch.float32, device=dev) if columns else vertical
    _vs_scores[grid](q_last, k, m_all, l_all, vertical, slash, column, *strides, heads, heads // kv_heads, n_last, n_keys,
                     n_blocks, tiles_per_chunk, qk_scale, N_OFFSET_BLOCKS=math.ceil((block_l - 1) / block_size) + 2,
                     STORE_COLUMNS=columns, **common)
    return (vertical, slash, column) if columns else (vertical, slash)
