"""Attention scores that the strategies' estimates and the kernels' references both compute. It lives below both
packages (like :mod:`patchattn.layout`) so that neither imports the other for it."""

from __future__ import annotations

import torch


def grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q @ k^T`` in float32 for (B, h, M, D) queries and (B, h_kv, N, D) keys (GQA by reshaping the
    queries of a key head into one matrix, so keys are neither expanded nor copied per query head): (B, h, M, N)."""
    batch, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    grouped = (q.float() * scale).reshape(batch, kv_heads, (heads // kv_heads) * rows, dim)
    return torch.matmul(grouped, k.float().transpose(-1, -2)).view(batch, heads, rows, k.shape[2])
