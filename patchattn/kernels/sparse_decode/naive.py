"""Plain-PyTorch page-sparse decode attention: the reference for the Triton kernel and the CPU backend.

It gathers only the tokens of each KV head's pages (never the whole cache as a dense mask), so it is also a
real, memory-light CPU path.
"""

from __future__ import annotations

import math

import torch


def sparse_decode_naive(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_ids: torch.Tensor,
    page_counts: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over a per-KV-head list of cache pages.

    Shapes: ``q`` (B, Hq, D), the new token's queries (RoPE already applied); ``k_cache``, ``v_cache``
    (B, Hkv, S_max, D) with Hq a multiple of Hkv: query head h reads KV head ``h // (Hq // Hkv)``.
    ``page_ids`` (B, Hkv, max_pages) int and ``page_counts`` (B, Hkv) int: each KV head's own list of pages,
    page p = tokens [p * page_size, (p + 1) * page_size), ascending, the first ``count`` entries valid (the
    rest are ignored). The lists are per KV head, so the query heads of a GQA group share them (and, in the
    kernel, one read of K/V). Tokens at positions >= ``seq_lens[b]`` (B,) int, or >= ``seq_lens[b, kvh]``
    (B, Hkv) int (or >= S_max), are masked, so the last page may be partial; the per-head form lets heads share
    one pool expanded with a zero head stride (see the kernel's docstring). A head whose list selects no token gets a zero output.
    Returns (B, Hq, D) in q's dtype; scores, softmax and the weighted sum in float32 (float64 for float64 q).
    """
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, s_max = k_cache.shape[1], k_cache.shape[2]
    group = n_q_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    device = q.device

    max_pages = page_ids.shape[-1]
    offsets = torch.arange(page_size, device=device)
    positions = (page_ids.long()[..., None] * page_size + offsets).reshape(batch, n_kv_heads, max_pages * page_size)
    slot_valid = (torch.arange(max_pages, device=device) < page_counts.long()[..., None]).repeat_interleave(page_size, -1)
    seq_limit = seq_lens.long().clamp(max=s_max).reshape(batch, -1, 1)
    valid = slot_valid & (positions >= 0) & (positions < seq_limit)  # (B, Hkv, T)
    index = positions.clamp(0, s_max - 1)[..., None].expand(-1, -1, -1, head_dim)
    k_sel = torch.gather(k_cache, 2, index).to(compute_dtype)  # (B, Hkv, T, D)
    v_sel = torch.gather(v_cache, 2, index).to(compute_dtype).masked_fill(~valid[..., None], 0.0)  # junk must not leak

    q_grouped = q.to(compute_dtype).view(batch, n_kv_heads, group, head_dim)
    scores = torch.matmul(q_grouped, k_sel.transpose(-1, -2)) * scale  # (B, Hkv, G, T)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, v_sel)  # (B, Hkv, G, D)
    return out.reshape(batch, n_q_heads, head_dim).to(q.dtype)
