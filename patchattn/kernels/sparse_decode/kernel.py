"""Triton page-sparse decode attention (flash-decoding: the page list split across programs, then combined).

Contract (identical to :func:`patchattn.kernels.sparse_decode.naive.sparse_decode_naive`):

    sparse_decode_triton(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale=None) -> (B, Hq, D)

* ``q`` (B, Hq, D): one new query token per sequence, RoPE applied. ``k_cache``, ``v_cache`` (B, Hkv, S_max, D),
  Hq a multiple of Hkv: query head ``h`` reads KV head ``h // (Hq // Hkv)`` (indexed, never copied or expanded).
* ``page_ids`` (B, Hkv, max_pages) int32 and ``page_counts`` (B, Hkv) int32: each KV head's own ascending list
  of pages (page p = tokens [p * page_size, (p + 1) * page_size)), the first ``count`` entries valid. Lists
  differ in length per head (head-wise budgets: the full cache, sink + window pages, query-aware top pages).
* ``seq_lens`` (B,) or (B, Hkv) int: tokens at positions >= seq_lens[b] (or seq_lens[b, kvh]) are masked (the
  last page may be partial). The per-head form lets several heads share one pool of pages: pass the pool as
  ``k_cache = pool.unsqueeze(1).expand(B, Hkv, S, D)`` (a zero head stride, nothing copied), each head's pages as
  pool pages and its limit as the end of its own valid run (the head-budgeted cache does this).
* fp16 or bf16, head dim 64, 128 or 256, ``page_size`` 16, 32, 64 or 128. Returns q's dtype; softmax statistics and
  the output are accumulated in float32. A head whose list selects no token gets a zero output.

How it runs: decode reads every selected K/V byte once and does ~2 FLOP per byte, so the kernel is a
bandwidth problem and the whole design is about keeping enough loads in flight. The grid is (B * Hkv, splits):
program (b, kvh, s) walks tiles [s * tiles_per_split, (s + 1) * tiles_per_split) of that head's page list, a
tile being BLOCK_N list tokens (BLOCK_N // page_size whole pages, gathered by pointer arithmetic: each page is
a contiguous run of rows). It keeps the GQA group's G query rows as one [GROUP_PAD, D] tile (padded with zero
rows to the 16 rows ``tl.dot`` needs), so each K/V tile is read once for all the group's heads, and runs the
online softmax (base 2, log2(e) folded into the scale). ``splits`` and ``tiles_per_split`` come from shapes
only (``max_pages``, no device sync): enough programs to fill the SMs (:data:`TARGET_PROGRAMS_PER_SM`), each
with at least :data:`MIN_TILES_PER_SPLIT` tiles; heads with shorter lists simply leave their last programs
empty. Each program writes its un-normalised float32 partial (max, sum, acc) to a workspace, and a second
small kernel combines a head's splits. With one split the first kernel writes the output directly.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ...input_device import launches_on_input_device

LOG2E = 1.4426950408889634
NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: empty splits stay NaN-free

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_PAGE_SIZES = (16, 32, 64, 128)

# Launch configuration per head dim: (BLOCK_N list tokens per tile, num_warps, num_stages). BLOCK_N is raised
# to the page size when a page is larger. Measured on an H100: benchmarks/NOTES_decode.md.
CONFIGS: dict[int, tuple[int, int, int]] = {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 3)}  # 256 (Gemma 3): untimed
TARGET_PROGRAMS_PER_SM = 4  # splits are chosen so that B * Hkv * splits reaches this many programs per SM
MIN_TILES_PER_SPLIT = 2  # ...but no split gets fewer tiles than this (tiny lists run unsplit)
CPU_SM_COUNT = 4  # stands in for the SM count under Triton's CPU interpreter


@triton.jit
def _sparse_decode_split(
    Q, K, V, IDS, COUNTS, SEQ_LENS, O, MID,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih,
    stride_cb, stride_ch,
    stride_sb, stride_sh,
    stride_ob, stride_oh,
    n_kv_heads, n_splits, tiles_per_split, n_mid_rows, qk_scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_OUT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads

    count = tl.load(COUNTS + b.to(tl.int64) * stride_cb + kvh.to(tl.int64) * stride_ch)
    seq_len = tl.load(SEQ_LENS + b.to(tl.int64) * stride_sb + kvh.to(tl.int64) * stride_sh)
    n_tiles = tl.cdiv(count * PAGE, BLOCK_N)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, n_tiles)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_heads = kvh * GROUP + offs_g  # the group's query heads (rows >= GROUP are padding)
    row_ok = offs_g < GROUP
    q_ptrs = Q + b.to(tl.int64) * stride_qb + q_heads[:, None].to(tl.int64) * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    ids_row = IDS + b.to(tl.int64) * stride_ib + kvh.to(tl.int64) * stride_ih

    m_i = tl.full([GROUP_PAD], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    PAGES_PER_TILE: tl.constexpr = BLOCK_N // PAGE
    for t in range(tile_start, tile_end):
        slot = t * PAGES_PER_TILE + offs_n // PAGE  # position in the page list of each of the tile's tokens
        page = tl.load(ids_row + slot, mask=slot < count, other=0)
        pos = page * PAGE + offs_n % PAGE
        valid = (slot < count) & (pos < seq_len)
        k = tl.load(k_base + pos[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + pos[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(valid[None, :], qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if SPLIT_OUT:  # partials in row (b * Hq + h) * n_splits + split of the workspace's acc, max and sum parts
        mid_row = (b * (n_kv_heads * GROUP) + q_heads).to(tl.int64) * n_splits + split
        tl.store(MID + mid_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(MID + n_mid_rows * HEAD_DIM + mid_row, m_i, mask=row_ok)
        tl.store(MID + n_mid_rows * (HEAD_DIM + 1) + mid_row, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty list: acc is 0, so is the output
        o_ptrs = O + b.to(tl.int64) * stride_ob + q_heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _combine_splits(
    MID, O,
    n_q_heads, n_splits, n_mid_rows, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program per (b, query head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
    MID_M = MID + n_mid_rows.to(tl.int64) * HEAD_DIM
    MID_L = MID_M + n_mid_rows
    pid = tl.program_id(0)
    b = pid // n_q_heads
    h = pid % n_q_heads
    row0 = pid.to(tl.int64) * n_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    m_max = tl.full([BLOCK_S], NEG_BIG, dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        m = tl.load(MID_M + row0 + s0 + offs_s, mask=s0 + offs_s < n_splits, other=NEG_BIG)
        m_max = tl.maximum(m_max, m)
    m_all = tl.max(m_max, 0)
    l_sum = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        in_range = s0 + offs_s < n_splits
        m = tl.load(MID_M + row0 + s0 + offs_s, mask=in_range, other=NEG_BIG)
        l = tl.load(MID_L + row0 + s0 + offs_s, mask=in_range, other=0.0)
        o = tl.load(MID + (row0 + s0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=in_range[:, None], other=0.0)
        w = tl.math.exp2(m - m_all)
        l_sum += w * l
        acc += tl.sum(w[:, None] * o, 0)
    l_total = tl.sum(l_sum, 0)
    out = acc / tl.where(l_total > 0, l_total, 1.0)
    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d, out.to(O.dtype.element_ty))


def combine_splits_torch(mid: torch.Tensor, out: torch.Tensor, n_splits: int) -> torch.Tensor:
    """The combine step in torch ops (for comparison with :func:`_combine_splits`; several launches)."""
    batch, n_q_heads, head_dim = out.shape
    n_rows = batch * n_q_heads * n_splits
    mid_o = mid[: n_rows * head_dim].view(batch, n_q_heads, n_splits, head_dim)
    mid_m = mid[n_rows * head_dim : n_rows * (head_dim + 1)].view(batch, n_q_heads, n_splits)
    mid_l = mid[n_rows * (head_dim + 1) :].view(batch, n_q_heads, n_splits)
    w = torch.exp2(mid_m - mid_m.amax(-1, keepdim=True))
    l_total = (w * mid_l).sum(-1, keepdim=True)
    acc = (w[..., None] * mid_o).sum(-2)
    out.copy_(torch.where(l_total > 0, acc / l_total, 0.0))
    return out


def unsupported_reason(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_size: int) -> str | None:
    """Why the kernel cannot take these inputs, or None if it can (device checked by the caller)."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        return "q must be (B, Hq, D) and the caches (B, Hkv, S_max, D)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16 or bfloat16)"
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return "q, k_cache and v_cache must share one dtype"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or k_cache.shape[-1] != q.shape[-1] or v_cache.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]} (the kernel takes {SUPPORTED_HEAD_DIMS}, equal for q, k and v)"
    if page_size not in SUPPORTED_PAGE_SIZES:
        return f"page_size {page_size} (the kernel takes {SUPPORTED_PAGE_SIZES})"
    if k_cache.shape[1] != v_cache.shape[1] or q.shape[1] % k_cache.shape[1] != 0:
        return "Hq must be a multiple of Hkv (and k_cache, v_cache must have the same heads)"
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[0] != q.shape[0]:
        return "k_cache and v_cache must be (B, Hkv, S_max, D) with q's batch"
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(n_seq_heads: int, n_tiles_max: int, n_sm: int, programs_per_sm: int = TARGET_PROGRAMS_PER_SM) -> tuple[int, int]:
    """(splits, tiles_per_split): enough programs for ``programs_per_sm`` per SM, at least MIN_TILES_PER_SPLIT each."""
    n_tiles_max = max(n_tiles_max, 1)
    splits = triton.cdiv(programs_per_sm * n_sm, n_seq_heads)
    splits = max(1, min(splits, triton.cdiv(n_tiles_max, MIN_TILES_PER_SPLIT)))
    tiles_per_split = triton.cdiv(n_tiles_max, splits)
    return triton.cdiv(n_tiles_max, tiles_per_split), tiles_per_split


@launches_on_input_device
def sparse_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_ids: torch.Tensor,
    page_counts: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    programs_per_sm: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    combine: str = "triton",
    out: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Page-sparse decode attention (see the module docstring for the contract).

    Tuning overrides (for benchmarking and tests): ``num_splits`` (programs per KV head; default from
    :func:`choose_splits`), ``programs_per_sm`` (the target it uses), ``block_n``, ``num_warps``,
    ``num_stages`` (default :data:`CONFIGS`), ``combine`` ("triton": one small kernel; "torch": torch ops).
    ``out`` (optional, q's shape and dtype, unit stride on the head dim) receives the result. ``validate=False``
    skips the input checks (for callers that checked the same shapes once already).
    The split count depends on ``page_ids.shape[-1]`` (not on the counts, which stay on the device), so
    trim ``page_ids`` to the longest list for sparse budgets.
    """
    if validate and (reason := unsupported_reason(q, k_cache, v_cache, page_size)) is not None:
        raise ValueError(f"sparse_decode_triton: unsupported input: {reason}")
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group = n_q_heads // n_kv_heads
    if validate:
        _check_pages(page_ids, page_counts, seq_lens, batch, n_kv_heads)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    ids = page_ids.to(torch.int32)
    if ids.stride(-1) != 1:
        ids = ids.contiguous()
    counts = page_counts.to(torch.int32)
    lens = seq_lens.to(device=q.device, dtype=torch.int32)
    lens_2d = lens[:, None].expand(batch, n_kv_heads) if lens.dim() == 1 else lens
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError("out must have q's shape, dtype and device, and unit stride on the head dim")

    _, cfg_w, cfg_s = CONFIGS[head_dim]
    block_n, num_splits, tiles_per_split = _tiling(q, ids.shape[-1], page_size, batch * n_kv_heads, block_n, num_splits, programs_per_sm)
    split_out = num_splits > 1
    n_mid_rows = batch * n_q_heads * num_splits
    # One float32 workspace (a single allocation): acc rows (n_mid_rows, D), then maxima, then sums.
    mid = torch.empty(n_mid_rows * (head_dim + 2), device=q.device, dtype=torch.float32) if split_out else out

    _sparse_decode_split[(batch * n_kv_heads, num_splits)](
        q, k_cache, v_cache, ids, counts, lens_2d, out, mid,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        ids.stride(0), ids.stride(1),
        counts.stride(0), counts.stride(1),
        lens_2d.stride(0), lens_2d.stride(1),
        out.stride(0), out.stride(1),
        n_kv_heads, num_splits, tiles_per_split, n_mid_rows, scale * LOG2E,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        PAGE=page_size,
        BLOCK_N=block_n,
        SPLIT_OUT=split_out,
        num_warps=num_warps or cfg_w,
        num_stages=num_stages or cfg_s,
    )
    if split_out:
        _combine(mid, out, num_splits, n_mid_rows, combine)
    return out


def _check_pages(page_ids: torch.Tensor, page_counts: torch.Tensor, seq_lens: torch.Tensor, batch: int, n_kv_heads: int) -> None:
    """ValueError unless the page lists, their counts and the lengths have the shapes the kernel reads."""
    lens_ok = tuple(seq_lens.shape) in ((batch,), (batch, n_kv_heads))
    if page_ids.shape[:2] != (batch, n_kv_heads) or page_counts.shape != (batch, n_kv_heads) or not lens_ok:
        raise ValueError(
            f"page_ids {tuple(page_ids.shape)}, page_counts {tuple(page_counts.shape)}, seq_lens {tuple(seq_lens.shape)} "
            f"do not match (B, Hkv, max_pages), (B, Hkv), (B,) or (B, Hkv) with B={batch}, Hkv={n_kv_heads}"
        )


def _tiling(q: torch.Tensor, max_pages: int, page_size: int, n_seq_heads: int, block_n: int | None,
            num_splits: int | None, programs_per_sm: int | None) -> tuple[int, int, int]:
    """(block_n, splits, tiles per split) for page lists ``max_pages`` wide: :data:`CONFIGS`'s tile (at least a page)
    unless given, and :func:`choose_splits` for this device unless ``num_splits`` is given."""
    block_n = max(block_n or CONFIGS[q.shape[-1]][0], page_size)
    if block_n % page_size:
        raise ValueError(f"block_n {block_n} must be a multiple of page_size {page_size}")
    n_tiles_max = triton.cdiv(max_pages * page_size, block_n)
    if num_splits is not None:
        return block_n, num_splits, triton.cdiv(max(n_tiles_max, 1), num_splits)
    n_sm = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else CPU_SM_COUNT
    return block_n, *choose_splits(n_seq_heads, n_tiles_max, n_sm, programs_per_sm or TARGET_PROGRAMS_PER_SM)


def _combine(mid: torch.Tensor, out: torch.Tensor, num_splits: int, n_mid_rows: int, combine: str) -> None:
    """Merge the splits' partial outputs in ``mid`` into ``out`` (one small kernel, or torch ops)."""
    if combine == "torch":
        combine_splits_torch(mid, out, num_splits)
    elif combine == "triton":
        batch, n_q_heads, head_dim = out.shape
        _combine_splits[(batch * n_q_heads,)](
            mid, out, n_q_heads, num_splits, n_mid_rows, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=min(64, triton.next_power_of_2(num_splits)), num_warps=4,
        )
    else:
        raise ValueError(f"combine must be 'triton' or 'torch', not {combine!r}")
