"""Hopper (sm90) block-sparse prefill in Gluon: warp-specialised, the softmax overlapped with the tensor cores.

Same contract as :func:`patchattn.kernels.sparse_prefill.kernel.sparse_prefill_triton` for the layouts it takes
(``block_size`` 128, head dim 64 or 128, fp16/bf16, no token columns); :func:`unsupported_reason` says which.

Why a second kernel: the Triton kernel keeps both halves of its work in lockstep, so the tensor cores idle while
the warps run the softmax (exp2 costs about half as long as the two GEMMs of a tile at d=128 on an H100). Plain
Triton 3.6 did not overlap them (a software-pipelined version was slower, NOTES_prefill.md). Gluon, Triton's
lower-level language, exposes what FlashAttention-3 uses: asynchronous ``wgmma`` with explicit waits, TMA copies
completing on mbarriers, and warp specialisation. Per program (one tile of 128 query rows of one head):

* a 1-warp **producer** walks the row of ``kv_block_ids`` and TMA-copies K and V blocks into a ring of
  ``STAGES`` shared-memory slots (K and V on separate barriers, so a tile's scores start before its V lands);
* two 4-warp **consumers** (warpgroups), each owning 64 of the 128 query rows, share those slots. Each issues
  tile j's ``S = Q K^T`` and tile j-1's ``O += P V`` asynchronously, then does tile j's softmax; P goes to the
  second GEMM from registers (no shared-memory round trip);
* the consumers **take turns** on the tensor cores (FlashAttention-3's inter-warpgroup "ping-pong"): a
  consumer issues its two GEMMs only after the other has issued its own, through a pair of mbarriers, so one's
  GEMMs run while the other computes its softmax.

Measured on an H100 (d=128, bf16, dense causal 32K; benchmarks/prefill_gluon_variants*_h100_2026-11-25.json): 2 stages
16.5 ms, 3 stages 14.1 ms (~620 TFLOP/s; SDPA's cuDNN 14.2 ms, the Triton kernel 17.2): the deeper K/V ring is what
pays; the turns gain 10% on sink + window rows at 32K (4.30 -> 3.88 ms) and are within +-2% elsewhere. Within one
consumer the softmax does not overlap its own ``P V``: ptxas places the wait for the ``P V`` before the exponentials
whatever the order written (seen in the SASS), so any overlap comes from the other warpgroup.

Masking is per tile: a key block that reaches a row's position (the diagonal) or the key tail is masked at token
level, others not at all. Softmax in base 2, statistics and the output accumulated in float32.
"""

from __future__ import annotations

import math

import torch
import triton

try:  # Gluon ships with Triton >= 3.5; its Hopper API as in 3.6
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # TMA load: ``async_copy_global_to_shared`` in Triton 3.6, ``async_load`` from 3.7 on
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - older Triton
    HAVE_GLUON = False

from ...input_device import launches_on_input_device
from .kernel import unsupported_reason as triton_unsupported_reason

LOG2E = 1.4426950408889634
STAGES = 3  # K/V ring depth: 3 x 64 KB at d=128 plus Q's 32 KB fits the 227 KB of an H100 (2 stages: 14.2 -> 16.5 ms)
CONSUMER_REGS = 240
PRODUCER_REGS = 24
# Head dims sparse_prefill hands to this kernel: measured faster than the Triton kernel on an H100 at d=128; d=64 is
# correct (tested) but untimed, so the Triton kernel keeps it until it is measured.
DISPATCH_HEAD_DIMS = (128,)
PINGPONG = True  # the consumers take turns issuing their GEMMs (FlashAttention-3's inter-warpgroup schedule)

if HAVE_GLUON:

    @gluon.jit
    def _producer(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_empty, ids_row, count, kv_row0,
                  BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, ELEM_BYTES: gl.constexpr):
        TILE_BYTES: gl.constexpr = BLOCK_N * HEAD_DIM * ELEM_BYTES
        for j in range(count):
            slot = j % STAGES
            phase = (j // STAGES) & 1
            row = kv_row0 + gl.load(ids_row + j) * BLOCK_N
            mbarrier.wait(kv_empty.index(slot), phase ^ 1)  # a fresh barrier passes a wait on parity 1
            mbarrier.expect(k_ready.index(slot), TILE_BYTES)
            _tma_load(k_desc, [row, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.expect(v_ready.index(slot), TILE_BYTES)
            _tma_load(v_desc, [row, 0], v_ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def _softmax(s, m_i, l_i, kb, pos, n_k, qk_scale, MASKED: gl.constexpr, BLOCK_N: gl.constexpr,
                 s_layout: gl.constexpr):
        """One tile's scores -> probabilities against the running max; the running sum and the rescale factor.
        MASKED: the tile reaches the rows' own positions (the diagonal) or the key tail, masked per token."""
        if MASKED:
            k_pos = kb * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
            allowed = (k_pos[None, :] <= pos[:, None]) & (k_pos < n_k)[None, :]
            s = s * qk_scale + gl.where(allowed, 0.0, -1.0e6)
            m_new = gl.maximum(m_i, gl.max(s, 1))
            s = s - m_new[:, None]
        else:
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            s = s * qk_scale - m_new[:, None]
        p = gl.exp2(s)
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _step(j, q_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, ids_row, acc, p_op, m_i, l_i, alpha, zero_s,
              pos, n_k, qk_scale, MASKED: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HALF: gl.constexpr,
              PINGPONG: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
        """Tile j's scores and softmax, overlapped with tile j-1's P V; frees tile j-1's slot.

        ``p_op`` (tile j-1's probabilities, the A operand of P V in registers) is read by the asynchronous P V, so
        tile j's probabilities stay in their scores' registers until it has finished, and only then become the
        next ``p_op``: writing them over the operand earlier would make ptxas wait for the P V at once."""
        slot = j % STAGES
        prev = (j - 1) % STAGES
        kb = gl.load(ids_row + j)
        mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        if PINGPONG:  # the two warpgroups take turns on the tensor cores: one's GEMMs run under the other's softmax
            mbarrier.wait(turn.index(HALF), j & 1)
        s_tok = warpgroup_mma(q_tile, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - HALF), count=1)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        p, m_i, l_i, alpha = _softmax(s, m_i, l_i, kb, pos, n_k, qk_scale, MASKED, BLOCK_N, s_layout)
        acc, p_op = warpgroup_mma_wait(0, deps=[o_tok, p_op])
        mbarrier.arrive(kv_empty.index(prev), count=1)
        p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        return acc, p_op, m_i, l_i, alpha

    @gluon.jit
    def _consumer(Q, O, q_smem, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, ids_row, count,
                  q_base, o_base, stride_qn, stride_on, row0, n_q, q_shift, n_k, qk_scale,
                  HALF: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                  STAGES: gl.constexpr, PINGPONG: gl.constexpr):
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        dtype: gl.constexpr = q_smem.dtype

        # this warpgroup's 64 query rows: load them and park them in shared memory as the A operand of Q K^T
        rows = row0 + HALF * HALF_M + gl.arange(0, HALF_M, gl.SliceLayout(1, ld_layout))
        cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, ld_layout))
        q = gl.load(Q + q_base + rows[:, None].to(gl.int64) * stride_qn + cols[None, :], mask=(rows < n_q)[:, None], other=0.0)
        q_tile = q_smem.index(HALF)
        q_tile.store(q)
        fence_async_shared()

        first_pos = row0 + HALF * HALF_M + q_shift
        pos = first_pos + gl.arange(0, HALF_M, gl.SliceLayout(1, s_layout))
        zero_s = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([HALF_M], -float("inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([HALF_M], gl.float32, gl.SliceLayout(1, s_layout))

        # Key tiles from the one holding position first_pos + 1 on reach these rows (or the key tail): masked. Ids
        # ascend and the layout is causal in positions, so they are the row's last one or two.
        first_masked = (first_pos + 1) // BLOCK_N
        last_id = gl.load(ids_row + count - 1)
        prev_id = gl.load(ids_row + count - 2, mask=count >= 2, other=0)
        n_full = count - (last_id >= first_masked).to(gl.int32) - ((count >= 2) & (prev_id >= first_masked)).to(gl.int32)

        # tile 0: scores and softmax, nothing to overlap yet
        mbarrier.wait(k_ready.index(0), 0)
        if PINGPONG:
            if HALF == 1:
                mbarrier.arrive(turn.index(0), count=1)  # the first warpgroup goes first
            mbarrier.wait(turn.index(HALF), 0)
        s_tok = warpgroup_mma(q_tile, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - HALF), count=1)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        kb0 = gl.load(ids_row)
        if n_full > 0:
            p, m_i, l_i, alpha = _softmax(s, m_i, l_i, kb0, pos, n_k, qk_scale, False, BLOCK_N, s_layout)
        else:
            p, m_i, l_i, alpha = _softmax(s, m_i, l_i, kb0, pos, n_k, qk_scale, True, BLOCK_N, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        # the loops carry no branch between a wgmma's issue and its wait (ptxas would wait early)
        for j in range(1, n_full):
            acc, p_op, m_i, l_i, alpha = _step(j, q_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, ids_row, acc,
                                               p_op, m_i, l_i, alpha, zero_s, pos, n_k, qk_scale, False, BLOCK_N,
                                               STAGES, HALF, PINGPONG, s_layout, o_layout, p_layout)
        for j in range(gl.maximum(n_full, 1), count):
            acc, p_op, m_i, l_i, alpha = _step(j, q_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, ids_row, acc,
                                               p_op, m_i, l_i, alpha, zero_s, pos, n_k, qk_scale, True, BLOCK_N,
                                               STAGES, HALF, PINGPONG, s_layout, o_layout, p_layout)
        last = (count - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((count - 1) // STAGES) & 1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        if PINGPONG:
            mbarrier.wait(turn.index(HALF), count & 1)
        o_tok = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - HALF), count=1)
        acc = warpgroup_mma_wait(0, deps=[o_tok])
        mbarrier.arrive(kv_empty.index(last), count=1)

        acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
        o_rows = row0 + HALF * HALF_M + gl.arange(0, HALF_M, gl.SliceLayout(1, o_layout))
        o_cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, o_layout))
        o_ptrs = O + o_base + o_rows[:, None].to(gl.int64) * stride_on + o_cols[None, :]
        gl.store(o_ptrs, acc.to(dtype), mask=(o_rows < n_q)[:, None])

    @gluon.jit
    def _sparse_prefill_hopper(
        Q, O, k_desc, v_desc, COUNTS, IDS,
        stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq,
        n_q_heads, n_kv_heads, kv_group, n_q, n_k, n_programs_m, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, ELEM_BYTES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, PINGPONG: gl.constexpr,
    ):
        HALF_M: gl.constexpr = 64
        pid_bh = gl.program_id(0)
        pid_m = n_programs_m - 1 - gl.program_id(1)  # longest causal rows first
        b = pid_bh // n_q_heads
        h = pid_bh % n_q_heads
        kvh = h // kv_group
        count = gl.load(COUNTS + b.to(gl.int64) * stride_cb + h.to(gl.int64) * stride_ch + pid_m)
        ids_row = IDS + b.to(gl.int64) * stride_ib + h.to(gl.int64) * stride_ih + pid_m.to(gl.int64) * stride_iq
        q_base = b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh
        o_base = b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        kv_row0 = (b * n_kv_heads + kvh) * n_k
        row0 = pid_m * (2 * HALF_M)

        dtype: gl.constexpr = k_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, HEAD_DIM], k_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a slot
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)

        q_shift = n_k - n_q
        gl.warp_specialize(
            [
                (_consumer, (Q, O, q_smem, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, ids_row, count,
                             q_base, o_base, stride_qn, stride_on, row0, n_q, q_shift, n_k, qk_scale,
                             0, HALF_M, BLOCK_N, HEAD_DIM, STAGES, PINGPONG)),
                (_consumer, (Q, O, q_smem, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, ids_row, count,
                             q_base, o_base, stride_qn, stride_on, row0, n_q, q_shift, n_k, qk_scale,
                             1, HALF_M, BLOCK_N, HEAD_DIM, STAGES, PINGPONG)),
                (_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_empty, ids_row, count, kv_row0,
                             BLOCK_N, HEAD_DIM, STAGES, ELEM_BYTES)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )


def hopper_reason(q: torch.Tensor, block_size: int) -> str | None:
    """What this kernel needs beyond what the Triton kernel takes (None if met): Gluon, an sm90 GPU, block size 128."""
    if not HAVE_GLUON:
        return "this Triton has no Gluon"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not a Hopper (sm90) GPU"
    if block_size != 128:
        return f"block_size {block_size} (takes 128)"
    return None


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> str | None:
    """Why this kernel cannot take these inputs (None if it can): the Triton kernel's conditions, then Hopper's."""
    return triton_unsupported_reason(q, k, v, block_size) or hopper_reason(q, block_size)


@launches_on_input_device
def sparse_prefill_hopper(q, k, v, kv_block_counts, kv_block_ids, block_size, scale=None, *, out=None,
                          stages: int = STAGES, consumer_regs: int = CONSUMER_REGS, producer_regs: int = PRODUCER_REGS,
                          pingpong: bool = PINGPONG):
    """Block-sparse causal attention on Hopper (contract: ``sparse_prefill_triton``; see the module docstring)."""
    reason = unsupported_reason(q, k, v, block_size)
    if reason is not None:
        raise ValueError(f"sparse_prefill_hopper: unsupported input: {reason}")
    batch, n_q_heads, n_q, head_dim = q.shape
    n_kv_heads, n_k = k.shape[1], k.shape[2]
    n_q_blocks = -(-n_q // block_size)
    if kv_block_counts.shape != (batch, n_q_heads, n_q_blocks) or kv_block_ids.shape[:3] != (batch, n_q_heads, n_q_blocks):
        raise ValueError("layout shape does not match (B, Hq, n_q_blocks)")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v = k.contiguous(), v.contiguous()  # TMA reads them as (B * Hkv * Nk, D)
    counts = kv_block_counts.to(torch.int32).contiguous()
    ids = kv_block_ids.to(torch.int32)
    ids = ids if ids.stride(-1) == 1 else ids.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError("out must have q's shape, dtype and device, and unit stride on the head dim")
    el = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    smem_layout = gl.NVMMASharedLayout.get_default_for([block_size, head_dim], el)
    k_desc = TensorDescriptor.from_tensor(k.view(-1, head_dim), [block_size, head_dim], smem_layout)
    v_desc = TensorDescriptor.from_tensor(v.view(-1, head_dim), [block_size, head_dim], smem_layout)
    n_programs_m = n_q_blocks  # one program per layout row: 128 query rows, two warpgroups of 64
    grid = (batch * n_q_heads, n_programs_m)
    while True:
        try:
            _sparse_prefill_hopper[grid](
                q, out, k_desc, v_desc, counts, ids,
                q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
                counts.stride(0), counts.stride(1), ids.stride(0), ids.stride(1), ids.stride(2),
                n_q_heads, n_kv_heads, n_q_heads // n_kv_heads, n_q, n_k, n_programs_m, scale * LOG2E,
                HEAD_DIM=head_dim, BLOCK_N=block_size, STAGES=stages, ELEM_BYTES=q.element_size(),
                CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, PINGPONG=pingpong,
                num_warps=4,
            )
            return out
        except triton.runtime.errors.OutOfResources:
            if stages <= 2:  # a Hopper part with less shared memory than the H100's 227 KB: a shallower ring
                raise
            stages -= 1
