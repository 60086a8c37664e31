"""Triton: finish a raw block layout and compact it to the ragged form, one program per layout row.

Contract (identical to :func:`patchattn.kernels.ragged.naive.finalize_ragged_naive`):

    finalize_ragged_triton(keep) -> (kv_block_counts, kv_block_ids, density)

``keep`` (B, H, n, n) bool, any strides. Row ``i`` keeps key block ``j`` when ``j <= i`` and (``keep[..., i, j]``
or ``j == i`` or ``i == n - 1`` or ``i < dense_rows``), and ``j > i - window_rows`` when ``window_rows`` > 0; its kept ids are written in ascending order, then zeros. Counts are int32
(B, H, n); ids int32 (B, H, n, max_count) (a view of an (B, H, n, n) buffer); ``density`` = kept blocks / causal blocks.

What it replaces: finalize (clone, causal and diagonal masks) + to_ragged (sum, sort, where) ~17 small launches
per layer, which on small models cost more host time than the attention itself. Each program loads its row once,
ranks the kept entries with a prefix sum and scatters every slot exactly once (kept ids first, then zeros),
and adds its count to two device scalars (longest row, total) that the host reads in the same one sync as before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...input_device import launches_on_input_device


@triton.jit
def _finalize_ragged(
    KEEP, COUNTS, IDS, STATS,
    stride_kb, stride_kh, stride_kq,
    n_heads, n_blocks, dense_rows, window_rows,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)  # (batch * heads) * n_blocks + row
    row = pid % n_blocks
    bh = pid // n_blocks
    b = bh // n_heads
    h = bh % n_heads
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_blocks
    raw = tl.load(KEEP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + row.to(tl.int64) * stride_kq + cols,
                  mask=in_row, other=0)
    kept = ((raw != 0) | (cols == row) | (row == n_blocks - 1) | (row < dense_rows)) & (cols <= row)
    kept = kept & ((window_rows == 0) | (cols > row - window_rows))
    kept_i = kept.to(tl.int32)
    rank = tl.cumsum(kept_i, axis=0) - kept_i  # kept entries before this one
    count = tl.sum(kept_i, axis=0)
    dropped_rank = cols - rank  # dropped entries before this one (for a dropped entry)
    slot = tl.where(kept, rank, count + dropped_rank)
    value = tl.where(kept, cols, 0)
    tl.store(IDS + pid.to(tl.int64) * n_blocks + slot, value, mask=in_row)
    tl.store(COUNTS + pid, count)
    tl.atomic_max(STATS, count.to(tl.int64))
    tl.atomic_add(STATS + 1, count.to(tl.int64))


@launches_on_input_device
def finalize_ragged_triton(
    keep: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None, dense_rows: int = 0, sync: bool = True,
    window_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """``out``: optional (counts, ids) buffers of shapes (B, H, n) and (B, H, n, n), int32, contiguous;
    ``dense_rows``: the first rows read every causal block (a recipe's dense prefix); ``sync=False`` reads nothing back
    (for CUDA graphs): the ids come full width (B, H, n, n) and the density as None; ``window_rows``: a sliding
    window's reach in blocks (:func:`patchattn.layout.window_blocks`)."""
    if keep.dim() != 4 or keep.shape[-1] != keep.shape[-2] or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a (B, H, n, n) bool layout, got {tuple(keep.shape)} {keep.dtype}")
    batch, heads, n, _ = keep.shape
    if keep.stride(-1) != 1:
        keep = keep.contiguous()
    if out is None:
        counts = torch.empty(batch, heads, n, dtype=torch.int32, device=keep.device)
        ids = torch.empty(batch, heads, n, n, dtype=torch.int32, device=keep.device)
    else:
        counts, ids = out
        if counts.shape != (batch, heads, n) or ids.shape != (batch, heads, n, n) or not (counts.is_contiguous() and ids.is_contiguous()):
            raise ValueError("out must be contiguous int32 buffers of shapes (B, H, n) and (B, H, n, n)")
    stats = torch.zeros(2, dtype=torch.int64, device=keep.device)
    if keep.numel() == 0:
        return counts, ids, 0.0
    block = triton.next_power_of_2(n)
    _finalize_ragged[(batch * heads * n,)](
        keep, counts, ids, stats,
        keep.stride(0), keep.stride(1), keep.stride(2),
        heads, n, int(dense_rows), int(window_rows),
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
    if not sync:
        return counts, ids, None
    longest, total = stats.tolist()
    return counts, ids[..., : max(int(longest), 1)], total / (batch * heads * n * (n + 1) / 2)
