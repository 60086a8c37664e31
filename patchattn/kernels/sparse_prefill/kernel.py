"""Triton block-sparse causal attention for prefill (a FlashAttention-2 forward over a ragged block list).

Contract (identical to :func:`patchattn.kernels.sparse_prefill.naive.sparse_prefill_naive`, minus
``attn_mask``):

    sparse_prefill_triton(q, k, v, kv_block_counts, kv_block_ids, block_size, scale=None) -> (B, Hq, N, D)

* ``q`` (B, Hq, N, D); ``k``, ``v`` (B, Hkv, Nk, D), Hq a multiple of Hkv: query head ``h`` reads KV head
  ``h // (Hq // Hkv)`` (indexed in the kernel, K/V are never copied or expanded).
* ``kv_block_counts`` (B, Hq, ceil(N / block_size)) int32 and ``kv_block_ids`` (B, Hq, ceil(N / block_size),
  max_count) int32, as :func:`patchattn.layout.to_indices` makes them: the first ``count`` ids of a row are
  the kept key blocks in ascending order. Layouts are causal and keep the diagonal block.
* Query token ``t`` sits at absolute position ``Nk - N + t`` and sees keys at positions <= its own.
* fp16 or bf16, head dim 64, 128 or 256, ``block_size`` 64 or 128, any N (tails are masked), Nk >= N.
* ``window`` (optional): a sliding window of that many positions (Gemma, Mistral), masked in the kernel.
* Returns q's dtype; softmax statistics and the output are accumulated in float32.

How it runs: one program per (batch, query head, tile of BLOCK_M query rows; BLOCK_M divides block_size,
so a tile reads the ragged row of the layout block it lies in), launched with the heads fastest and the query
tiles in reverse order, so the longest rows of a causal layout start first (load balance) and the query
heads that share a KV head run side by side (K/V reuse in L2). Each program walks its row of
``kv_block_ids`` in two stages, as in Triton's fused-attention tutorial: stage 1 over the key blocks that lie
wholly before its first query (no mask at all), stage 2 over the last one or two blocks that reach its
queries (the diagonal; token-level causal mask and the key tail; key tiles wholly after its last query are
skipped). With Nk > N the layout must be causal in positions (no key block starting after the row's last
query position), which is what keeps the masked blocks to the last two. A layout block of ``block_size``
keys is visited as ``block_size // BLOCK_N`` tiles of BLOCK_N keys, loaded through TMA tensor descriptors on
Hopper (pointer arithmetic elsewhere). Softmax runs in base 2 with log2(e) folded into the scale. N and Nk
are run-time arguments, so one compiled kernel serves every length.

Token columns (optional, ``columns=``, ``column_counts=``, ``column_keep=``; prefill with Nk == N): single key
positions a head reads besides its blocks (token-granular vertical-slash). Before stage 1 a program walks its
layout row's first ``column_counts`` columns, all before its first query (no causal mask), BLOCK_N at a time: the
column ids are loaded, K and V rows gathered by pointer (TMA cannot gather on Hopper), and a column whose key block
the row holds anyway (a byte of ``column_keep``) is masked out, so the row reads the union of blocks and columns.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._device import launches_on_input_device

try:  # host-side tensor descriptors (TMA), Triton >= 3.4; the pointer path needs nothing
    from triton.tools.tensor_descriptor import TensorDescriptor

    _HAVE_TMA = True
except ImportError:  # pragma: no cover
    TensorDescriptor = None
    _HAVE_TMA = False

LOG2E = 1.4426950408889634
# Load K/V through TMA tensor descriptors on Hopper+ (when contiguous). Measured: see NOTES_prefill.md.
USE_TMA = True

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_BLOCK_SIZES = (64, 128)

# Launch configurations: BLOCK_M (query rows per program, divides block_size), BLOCK_N (keys per tile,
# divides block_size), num_warps, num_stages. Two per (head_dim, block_size), picked by how full the layout's
# layout is (``density``, its share of the causal blocks, which to_ragged reads with the layout's longest row;
# without it the longest row, a shape, stands in, but every finalized layout has one full row, its last): near-dense rows run best as 64-row query tiles with a
# deep TMA pipeline (H100, 32K dense: ~505 TF/s vs ~465 with 128-row tiles); sparse, scattered rows run best
# as 128-row tiles, which read each K/V block once for twice the queries (128K, 10% density: 35 ms vs 57 ms).
# d=128 measured on an H100 (benchmarks/NOTES_prefill.md); the d=64 rows reuse the shapes, untuned.
CONFIGS: dict[tuple[int, int], dict[str, tuple[int, int, int, int]]] = {
    (64, 64): {"dense": (64, 64, 4, 5), "sparse": (64, 64, 4, 5)},
    (64, 128): {"dense": (64, 64, 4, 5), "sparse": (128, 128, 8, 3)},
    (128, 64): {"dense": (64, 64, 4, 5), "sparse": (64, 64, 4, 5)},
    (128, 128): {"dense": (64, 64, 4, 5), "sparse": (128, 128, 8, 3)},
    # d=256 (Gemma 3): swept on an H100 over Gemma 3 270M's sliding layers at 32K (window 512; 4 q / 1 KV head;
    # benchmarks/prefill_window.py --sweep): 64 x 64 tiles, 4 warps, no pipelining 0.226 ms (the first guess,
    # 64 x 32 / 8 warps / 2 stages, 0.507); at block 128, 128 x 64 / 8 warps / 3 stages 0.234. Dense rows untimed.
    (256, 64): {"dense": (64, 64, 4, 1), "sparse": (64, 64, 4, 1)},
    (256, 128): {"dense": (64, 64, 4, 1), "sparse": (128, 64, 8, 3)},
}
# Software-pipeline depth of the token-column gather loop (index load -> K/V row gathers); None: the launch's
# num_stages. Measured on an H100 (10% token vertical-slash, 128K, bs 128): None 46.8 ms, 1: 63.8, 2: 55.5, 3: 47.7.
COLUMN_STAGES = None
DENSE_FRACTION = 0.5  # "dense" config when the layout keeps this share of the causal blocks (or its longest row of the key blocks)


@triton.jit
def _tile(acc, l_i, m_i, q, k, v, start_n, offs_n, q_pos, n_k, qk_scale, window, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """One BLOCK_N tile of keys: update the running max ``m_i``, sum ``l_i`` and output ``acc``. Masked tiles keep
    the causal keys before ``n_k`` and, with a window, those less than ``window`` positions back."""
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        k_pos = start_n + offs_n
        allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos < n_k)[None, :]
        if HAS_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        qk = qk * qk_scale + tl.where(allowed, 0.0, -1.0e6)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _load_kv(K, V, k_base, v_base, kv_row0, start_n, offs_n, offs_d, stride_kn, stride_vn, n_k,
             MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Keys and values [start_n, start_n + BLOCK_N) of one KV head, as (BLOCK_N, HEAD_DIM) tiles."""
    if USE_TMA:  # K, V are tensor descriptors over (B * Hkv * Nk, D); rows past the end come back as 0
        k = K.load([kv_row0 + start_n, 0])
        v = V.load([kv_row0 + start_n, 0])
    else:
        rows = start_n + offs_n
        k_ptrs = k_base + rows[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + rows[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(rows < n_k)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(rows < n_k)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _sparse_prefill_fwd(
    Q, K, V, O, COUNTS, IDS,
    KP, VP, COLS, COL_COUNTS, KEEP,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_iq,
    stride_colb, stride_colh, stride_ccb, stride_cch, stride_keb, stride_keh, stride_keq,
    n_q_heads, kv_group, n_q, n_k, n_programs_m, qk_scale, window,
    HEAD_DIM: tl.constexpr,
    LAYOUT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    HAS_COLUMNS: tl.constexpr,
    COLUMN_STAGES: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    # --- which (batch, head, query block) this program owns: heads fastest, longest rows (last blocks) first
    pid_bh = tl.program_id(0)
    pid_m = n_programs_m - 1 - tl.program_id(1)
    SUB: tl.constexpr = LAYOUT_BLOCK // BLOCK_M  # programs per layout query block
    qb = pid_m // SUB  # the layout row this program reads
    b = pid_bh // n_q_heads
    h = pid_bh % n_q_heads
    kvh = h // kv_group

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    if USE_TMA:
        k_base = K  # unused
        v_base = V
    else:
        k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    ids_row = IDS + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qb.to(tl.int64) * stride_iq
    count = tl.load(COUNTS + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + qb)

    q_first = pid_m * BLOCK_M  # first query row of this program
    offs_m = q_first + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_shift = n_k - n_q
    q_pos = offs_m + q_shift  # absolute positions of this block's queries
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=offs_m[:, None] < n_q, other=0.0)

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Key blocks that reach the first query position (or the key tail) need the mask. Ids ascend and the
    # layout is causal, so they are the last one or two entries of the row (one when Nk == N: the diagonal).
    first_masked = (q_first + q_shift) // LAYOUT_BLOCK
    last_id = tl.load(ids_row + count - 1)
    prev_id = tl.load(ids_row + count - 2, mask=count >= 2, other=0)
    n_masked = (last_id >= first_masked).to(tl.int32) + ((count >= 2) & (prev_id >= first_masked)).to(tl.int32)
    n_full = count - n_masked

    SPLIT: tl.constexpr = LAYOUT_BLOCK // BLOCK_N  # key tiles per layout block
    # Tiles of the last block wholly after this program's last query are skipped (BLOCK_M < LAYOUT_BLOCK).
    q_last = tl.minimum(q_first + BLOCK_M, n_q) - 1 + q_shift
    reach = q_last - last_id * LAYOUT_BLOCK  # how far into the last block this program's queries reach
    last_tiles = tl.where(reach >= 0, tl.minimum(reach // BLOCK_N + 1, SPLIT), 0)
    stage2_end = (count - 1) * SPLIT + last_tiles
    kv_row0 = (b * (n_q_heads // kv_group) + kvh) * n_k  # first row of this KV head in the TMA view
    # --- stage 0: token columns (all before this layout row's first query: no causal mask), gathered BLOCK_N at a
    # time by pointer; a column whose key block the row reads anyway is masked out (KEEP: the row's block layout)
    if HAS_COLUMNS:
        n_cols = tl.load(COL_COUNTS + b.to(tl.int64) * stride_ccb + h.to(tl.int64) * stride_cch + qb)
        cols_row = COLS + b.to(tl.int64) * stride_colb + h.to(tl.int64) * stride_colh
        keep_row = KEEP + b.to(tl.int64) * stride_keb + h.to(tl.int64) * stride_keh + qb.to(tl.int64) * stride_keq
        kp_base = KP + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        vp_base = VP + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
        for c0 in tl.range(0, n_cols, BLOCK_N, num_stages=COLUMN_STAGES):
            slot = c0 + offs_n
            listed = slot < n_cols
            col = tl.load(cols_row + slot, mask=listed, other=0)
            held = tl.load(keep_row + col // LAYOUT_BLOCK, mask=listed, other=1)
            use = listed & (held == 0)
            rows = col.to(tl.int64)
            k = tl.load(kp_base + rows[:, None] * stride_kn + offs_d[None, :], mask=use[:, None], other=0.0)
            v = tl.load(vp_base + rows[:, None] * stride_vn + offs_d[None, :], mask=use[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k)) * qk_scale + tl.where(use, 0.0, -1.0e6)[None, :]
            if HAS_WINDOW:  # columns behind the sliding window of a query are not its keys
                qk = qk + tl.where(col[None, :] > q_pos[:, None] - window, 0.0, -1.0e6)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_ij
    # --- stage 1a (sliding window): the row's first one or two blocks, which reach past the window's left edge for
    # some of this program's queries (the layout holds only blocks inside its first query's window): masked
    n_lead = 0
    if HAS_WINDOW:
        edge = q_last - window  # keys at or before it lie outside the last query's window
        first_id = tl.load(ids_row)
        second_id = tl.load(ids_row + 1, mask=count >= 2, other=0)
        n_lead = (first_id * LAYOUT_BLOCK <= edge).to(tl.int32) + ((count >= 2) & (second_id * LAYOUT_BLOCK <= edge)).to(tl.int32)
        n_lead = tl.minimum(n_lead, n_full)
        for j in range(0, n_lead * SPLIT):
            kb = tl.load(ids_row + j // SPLIT)
            start_n = kb * LAYOUT_BLOCK + (j % SPLIT) * BLOCK_N
            k, v = _load_kv(K, V, k_base, v_base, kv_row0, start_n, offs_n, offs_d, stride_kn, stride_vn, n_k, False, USE_TMA)
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, start_n, offs_n, q_pos, n_k, qk_scale, window, MASKED=True, HAS_WINDOW=True)
    # --- stage 1: key blocks wholly before the queries (and inside the window), no masking
    for j in tl.range(n_lead * SPLIT, n_full * SPLIT, warp_specialize=WARP_SPECIALIZE):
        kb = tl.load(ids_row + j // SPLIT)
        start_n = kb * LAYOUT_BLOCK + (j % SPLIT) * BLOCK_N
        k, v = _load_kv(K, V, k_base, v_base, kv_row0, start_n, offs_n, offs_d, stride_kn, stride_vn, n_k, False, USE_TMA)
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, start_n, offs_n, q_pos, n_k, qk_scale, window, MASKED=False, HAS_WINDOW=False)
    # --- stage 2: the diagonal (and key tail): token-level causal mask (and the window's, for small windows)
    for j in range(n_full * SPLIT, stage2_end):
        kb = tl.load(ids_row + j // SPLIT)
        start_n = kb * LAYOUT_BLOCK + (j % SPLIT) * BLOCK_N
        k, v = _load_kv(K, V, k_base, v_base, kv_row0, start_n, offs_n, offs_d, stride_kn, stride_vn, n_k, True, USE_TMA)
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k, v, start_n, offs_n, q_pos, n_k, qk_scale, window, MASKED=True, HAS_WINDOW=HAS_WINDOW)

    acc = acc / l_i[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < n_q)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> str | None:
    """Why the kernel cannot take these inputs, or None if it can (device checked by the caller)."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16 or bfloat16)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k and v must share one dtype"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]} (the kernel takes {SUPPORTED_HEAD_DIMS}, equal for q, k and v)"
    if block_size not in SUPPORTED_BLOCK_SIZES:
        return f"block_size {block_size} (the kernel takes {SUPPORTED_BLOCK_SIZES})"
    if q.shape[1] % k.shape[1] != 0 or k.shape[1] != v.shape[1]:
        return "Hq must be a multiple of Hkv (and k, v must have the same heads)"
    if k.shape[2] < q.shape[2]:
        return "Nk < N"
    return None


@launches_on_input_device
def sparse_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_counts: torch.Tensor,
    kv_block_ids: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool | None = None,
    warp_specialize: bool = False,
    out: torch.Tensor | None = None,
    density: float | None = None,
    columns: torch.Tensor | None = None,
    column_counts: torch.Tensor | None = None,
    column_keep: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Block-sparse causal attention (see the module docstring for the contract).

    ``block_m``, ``block_n``, ``num_warps``, ``num_stages`` override the :data:`CONFIGS` table (for
    benchmarking);
    ``use_tma`` (default :data:`USE_TMA` on Hopper or newer with contiguous K/V) loads K and V through
    tensor descriptors (the TMA copy engine) instead of pointer arithmetic; ``warp_specialize`` asks
    Triton to warp-specialize the main loop (experimental, off by default);
    ``out`` (optional, q's shape and dtype, unit stride on the head dim) receives the result;
    ``density`` (share of the causal blocks kept, as :func:`patchattn.layout.to_ragged` returns it) picks the
    launch configuration; without it the longest row does.
    Token columns (prefill, Nk == N): ``columns`` (B, Hq, C) ascending key positions, ``column_counts``
    (B, Hq, n_q_blocks) how many of them each query block reads (:func:`patchattn.layout.column_counts`), and
    ``column_keep`` (B, Hq, n_q_blocks, n_k_blocks) bool, the block layout (raw or finished): a column in a block it
    holds is skipped, so a row reads the union of its blocks and its columns, as the reference does.
    ``window`` > 0 (prefill, Nk == N): a sliding window, as transformers' models define theirs: query ``t`` sees key
    ``s`` only if ``t - window < s <= t``. The layout must then hold only blocks with a key inside the window of their
    row's first query (:func:`patchattn.layout.finalize` with ``window_rows``, from :func:`~patchattn.layout.window_blocks`), as it keeps the window masks to the
    first two blocks of a row.
    """
    reason = unsupported_reason(q, k, v, block_size)
    if reason is not None:
        raise ValueError(f"sparse_prefill_triton: unsupported input: {reason}")
    batch, n_q_heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    n_q_blocks = triton.cdiv(n_q, block_size)
    if kv_block_counts.shape != (batch, n_q_heads, n_q_blocks) or kv_block_ids.shape[:3] != (batch, n_q_heads, n_q_blocks):
        raise ValueError(
            f"layout shape {tuple(kv_block_counts.shape)} / {tuple(kv_block_ids.shape)} does not match "
            f"(B, Hq, n_q_blocks) = {(batch, n_q_heads, n_q_blocks)}"
        )
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    # The kernel needs unit stride on the head dim; everything else is passed as strides.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    counts = kv_block_counts.to(torch.int32).contiguous()
    ids = kv_block_ids.to(torch.int32)
    if ids.stride(-1) != 1:
        ids = ids.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError("out must have q's shape, dtype and device, and unit stride on the head dim")
    column_args = _column_operands(columns, column_counts, column_keep, counts, n_q, n_k, triton.cdiv(n_k, block_size))
    window = int(window or 0)
    if window < 0 or window and n_k != n_q:
        raise ValueError(f"window {window}: a sliding window must be >= 0 and is for prefill (Nk == N)")
    fill = ids.shape[-1] / triton.cdiv(n_k, block_size) if density is None else density
    _launch(q, k, v, out, counts, ids, column_args, block_size, scale, window, fill,
            block_m, block_n, num_warps, num_stages, use_tma, warp_specialize)
    return out


def _column_operands(columns: torch.Tensor | None, column_counts: torch.Tensor | None, column_keep: torch.Tensor | None,
                     counts: torch.Tensor, n_q: int, n_k: int, n_k_blocks: int) -> tuple | None:
    """The token-column operands as the kernel takes them, (columns, column counts, keep bytes, their 7 strides), after
    checking their shapes against the layout's ``counts`` (B, Hq, n_q_blocks); None without columns."""
    if columns is None:
        return None
    batch, n_q_heads, n_q_blocks = counts.shape
    if n_k != n_q:
        raise ValueError("token columns are for prefill (Nk == N)")
    if columns.shape[:2] != (batch, n_q_heads) or column_counts.shape != (batch, n_q_heads, n_q_blocks):
        raise ValueError(f"columns {tuple(columns.shape)} / column_counts {tuple(column_counts.shape)} do not match (B, Hq) = {(batch, n_q_heads)}")
    if column_keep is None or column_keep.shape != (batch, n_q_heads, n_q_blocks, n_k_blocks):
        raise ValueError("columns need column_keep, the (B, Hq, n_q_blocks, n_k_blocks) block layout")
    cols = columns.to(torch.int32)
    cols = cols if cols.stride(-1) == 1 else cols.contiguous()
    col_counts = column_counts.to(torch.int32)
    keep_u8 = column_keep.to(torch.uint8) if column_keep.dtype != torch.uint8 else column_keep
    keep_u8 = keep_u8 if keep_u8.stride(-1) == 1 else keep_u8.contiguous()
    col_strides = (cols.stride(0), cols.stride(1), col_counts.stride(0), col_counts.stride(1),
                   keep_u8.stride(0), keep_u8.stride(1), keep_u8.stride(2))
    return cols, col_counts, keep_u8, col_strides


def _launch(q, k, v, out, counts, ids, column_args: tuple | None, block_size: int, scale: float, window: int, fill: float,
            block_m, block_n, num_warps, num_stages, use_tma, warp_specialize: bool) -> None:
    """Pick the launch configuration (:data:`CONFIGS` by head dim, block size and the layout's ``fill``, unless
    overridden), load K/V through TMA descriptors where it can, and run the kernel into ``out``, retrying with a
    shallower pipeline where shared memory runs out."""
    batch, n_q_heads, n_q, head_dim = q.shape
    n_kv_heads, n_k = k.shape[1], k.shape[2]
    cols, col_counts, keep_u8, col_strides = column_args or (counts, counts, counts, (0,) * 7)  # unused without columns
    kind = "dense" if fill >= DENSE_FRACTION else "sparse"
    cfg_m, cfg_n, cfg_w, cfg_s = CONFIGS[(head_dim, block_size)][kind]
    block_m, block_n = block_m or cfg_m, block_n or cfg_n
    if block_size % block_n or block_size % block_m:
        raise ValueError(f"block_m {block_m} and block_n {block_n} must divide block_size {block_size}")
    tma_ok = _HAVE_TMA and k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9
    tma_ok = tma_ok and k.is_contiguous() and v.is_contiguous()
    use_tma = (USE_TMA if use_tma is None else use_tma) and tma_ok
    k_arg, v_arg = k, v
    if use_tma:
        k_arg = TensorDescriptor.from_tensor(k.view(-1, head_dim), [block_n, head_dim])
        v_arg = TensorDescriptor.from_tensor(v.view(-1, head_dim), [block_n, head_dim])

    n_programs_m = triton.cdiv(n_q, block_m)  # query tiles; tile i reads layout row i // (block_size // block_m)
    grid = (batch * n_q_heads, n_programs_m)
    num_warps = num_warps or cfg_w
    num_stages = num_stages or cfg_s
    while True:
        try:
            _sparse_prefill_fwd[grid](
                q, k_arg, v_arg, out, counts, ids,
                k, v, cols, col_counts, keep_u8,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                counts.stride(0), counts.stride(1),
                ids.stride(0), ids.stride(1), ids.stride(2),
                *col_strides,
                n_q_heads, n_q_heads // n_kv_heads, n_q, n_k, n_programs_m, scale * LOG2E, window,
                HEAD_DIM=head_dim,
                LAYOUT_BLOCK=block_size,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                USE_TMA=use_tma,
                WARP_SPECIALIZE=warp_specialize,
                HAS_COLUMNS=column_args is not None,
                COLUMN_STAGES=COLUMN_STAGES,
                HAS_WINDOW=window > 0,
                num_warps=num_warps,
                num_stages=num_stages,
            )
            break
        except triton.runtime.errors.OutOfResources:
            # GPUs with less shared memory than Hopper (A100: 164 KB): a shallower pipeline.
            if num_stages <= 2:
                raise
            num_stages -= 1
