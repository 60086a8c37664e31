"""Triton: Quest's page bounds for one decode query, without materialising the (B, h, G, P, D) products.

Contract: :func:`patchattn.cache.quest.page_bounds` on the pages ``candidates`` names, that is

    quest_bounds_triton(query, page_min, page_max, candidates) -> (B, h, P) float32

with ``query`` (B, h, G, D) each Quest head's query group, ``page_min``/``page_max`` (B, n_pool_pages, D) the pool's
page extremes, ``candidates`` (h, P) long each head's candidate pool pages: bound[b, h, p] = max over the group of
sum_d max(q_d min_d, q_d max_d) over page ``candidates[h, p]``.

What it replaces: two gathers of every candidate page's extremes, their float32 copies and the (B, h, G, P, D)
products the reference sums (at 128K, a Quest head's 8K pages: tens of MB per layer and step). One program per
(row, head, block of pages) reads each page's extremes once, as the decode kernel reads keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...input_device import launches_on_input_device


@triton.jit
def _quest_bounds(
    Q, PMIN, PMAX, CAND, OUT,
    stride_qb, stride_qh, stride_qg, stride_mb, stride_mp, stride_ch, stride_ob, stride_oh,
    n_heads, n_cand, G, D, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // n_heads
    h = bh % n_heads
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = p < n_cand
    pages = tl.load(CAND + h * stride_ch + p, mask=in_p, other=0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    in_g = g < G
    in_d = d < D
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + g[:, None] * stride_qg + d[None, :],
                mask=in_g[:, None] & in_d[None, :], other=0.0).to(tl.float32)  # (G, D)
    base = b.to(tl.int64) * stride_mb + pages[:, None] * stride_mp + d[None, :]
    both = in_p[:, None] & in_d[None, :]
    lo = tl.load(PMIN + base, mask=both, other=0.0).to(tl.float32)  # (P, D)
    hi = tl.load(PMAX + base, mask=both, other=0.0).to(tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for gi in range(0, G):
        qg = tl.sum(tl.where(g[:, None] == gi, q, 0.0), axis=0)  # (D,) row gi of the group
        bound = tl.sum(tl.maximum(qg[None, :] * lo, qg[None, :] * hi), axis=1)  # (P,)
        best = tl.maximum(best, bound)
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + p, best, mask=in_p)


def unsupported_reason(query, page_min) -> str | None:
    """Why the kernel does not take these inputs (None: it does)."""
    import os

    if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "not on a CUDA device"
    if query.stride(-1) != 1 or page_min.stride(-1) != 1:
        return "the head dimension is not contiguous"
    if query.shape[-1] > 256 or query.shape[2] > 16:
        return "head dimension over 256 or a query group over 16"
    return None


@launches_on_input_device
def quest_bounds_triton(query, page_min, page_max, candidates):
    batch, n_heads, group, dim = query.shape
    n_cand = candidates.shape[-1]
    out = torch.empty(batch, n_heads, n_cand, dtype=torch.float32, device=query.device)
    block_p = 32
    grid = (batch * n_heads, triton.cdiv(n_cand, block_p))
    _quest_bounds[grid](
        query, page_min, page_max, candidates, out,
        query.stride(0), query.stride(1), query.stride(2), page_min.stride(0), page_min.stride(1), candidates.stride(0),
        out.stride(0), out.stride(1),
        n_heads, n_cand, group, dim, BLOCK_P=block_p, BLOCK_G=triton.next_power_of_2(group),
        BLOCK_D=triton.next_power_of_2(dim),
    )
    return out
