"""Plain-PyTorch block-sparse attention: the reference for the Triton kernel and the CPU backend.

It computes only the kept key blocks of each query block (gathered, never a full N x N matrix), so it is
also a real, memory-light CPU path, not a masked dense attention.
"""

from __future__ import annotations

import math

import torch


def sparse_prefill_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_counts: torch.Tensor,
    kv_block_ids: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    column_counts: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Block-sparse causal attention.

    Shapes: ``q`` (B, Hq, N, D); ``k``, ``v`` (B, Hkv, Nk, D) with Hq a multiple of Hkv (query head h reads
    KV head ``h // (Hq // Hkv)``, no copy); ``kv_block_counts`` (B, Hq, ceil(N / block_size)) int;
    ``kv_block_ids`` (B, Hq, ceil(N / block_size), max_count) int, first ``count`` entries valid.
    Query token t sits at absolute position ``Nk - N + t`` (prefill: Nk == N) and sees keys at positions
    <= its own. ``attn_mask`` (optional) is a bool (B, 1 or Hq, N, Nk) mask, True = may attend (the model's
    own padding or sliding window), applied on top of the layout; ``window`` > 0 the model's sliding window given as
    its size instead (query position p sees keys at positions > p - window). Returns (B, Hq, N, D) in q's dtype,
    accumulated in float32.

    Token columns (optional, prefill only: Nk == N): ``columns`` (B, Hq, C) ascending key positions and
    ``column_counts`` (B, Hq, n_q_blocks) from :func:`patchattn.layout.column_counts`: query block ``i`` also reads
    the first ``column_counts[..., i]`` columns (all before its first token), except those in a key block it already
    reads: the union of the block layout and the columns.
    """
    batch, n_q_heads, n_q, head_dim = q.shape
    n_kv_heads, n_k = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    n_q_blocks = (n_q + block_size - 1) // block_size
    n_k_blocks = (n_k + block_size - 1) // block_size
    pad = n_k_blocks * block_size - n_k
    k_blocks = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(batch, n_kv_heads, n_k_blocks, block_size, head_dim)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(batch, n_kv_heads, n_k_blocks, block_size, head_dim)

    device = q.device
    batch_idx = torch.arange(batch, device=device)[:, None, None]
    kv_head_idx = (torch.arange(n_q_heads, device=device) // group)[None, :, None]
    offsets = torch.arange(block_size, device=device)
    q_shift = n_k - n_q
    out = torch.empty_like(q)
    for qb in range(n_q_blocks):
        row0, row1 = qb * block_size, min((qb + 1) * block_size, n_q)
        counts = kv_block_counts[:, :, qb].long()
        max_count = int(counts.max().item())
        ids = kv_block_ids[:, :, qb, :max_count].long()
        k_sel = k_blocks[batch_idx, kv_head_idx, ids].reshape(batch, n_q_heads, max_count * block_size, head_dim)
        v_sel = v_blocks[batch_idx, kv_head_idx, ids].reshape(batch, n_q_heads, max_count * block_size, head_dim)
        k_pos = (ids[..., None] * block_size + offsets).reshape(batch, n_q_heads, -1)
        slot_valid = (torch.arange(max_count, device=device) < counts[..., None]).repeat_interleave(block_size, -1)
        if columns is not None:  # the columns outside the rows' blocks, appended after them
            n_cols = column_counts[:, :, qb].long()
            widest = int(n_cols.max().item())
            if widest:
                cols = columns[:, :, :widest].long()
                in_blocks = ((cols // block_size)[..., None] == ids[..., None, :]) & (torch.arange(max_count, device=device) < counts[..., None])[..., None, :]
                col_valid = (torch.arange(widest, device=device) < n_cols[..., None]) & ~in_blocks.any(-1)
                cols = torch.where(col_valid, cols, 0)
                k_sel = torch.cat([k_sel, k[batch_idx, kv_head_idx, cols]], 2)
                v_sel = torch.cat([v_sel, v[batch_idx, kv_head_idx, cols]], 2)
                k_pos = torch.cat([k_pos, cols], -1)
                slot_valid = torch.cat([slot_valid, col_valid], -1)
        scores = torch.matmul(q[:, :, row0:row1].float(), k_sel.float().transpose(-1, -2)) * scale

        q_pos = torch.arange(row0, row1, device=device) + q_shift
        allowed = (k_pos[:, :, None, :] <= q_pos[:, None]) & (slot_valid & (k_pos < n_k))[:, :, None, :]
        if window:
            allowed &= k_pos[:, :, None, :] > q_pos[:, None] - window
        if attn_mask is not None:
            mask_rows = attn_mask[:, :, row0:row1].expand(batch, n_q_heads, row1 - row0, n_k)
            gathered = torch.gather(mask_rows, -1, k_pos.clamp(max=n_k - 1)[:, :, None, :].expand(-1, -1, row1 - row0, -1))
            allowed &= gathered
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, :, row0:row1] = torch.matmul(probs, v_sel.float()).to(q.dtype)
    return out
