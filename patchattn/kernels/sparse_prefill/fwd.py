"""The Triton program of the block-sparse prefill (launched by :func:`.kernel.sparse_prefill_triton`, whose docstring
states the contract).

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

import triton
import triton.language as tl


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
