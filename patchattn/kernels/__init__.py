"""Sparse attention kernels. (Placeholder dispatch until the Triton kernel lands: torch reference only.)"""

from .sparse_prefill.naive import sparse_prefill_naive


def available_backends() -> list[str]:
    return ["torch"]


def sparse_prefill(q, k, v, kv_block_counts, kv_block_ids, block_size, scale=None, attn_mask=None, backend="auto"):
    return sparse_prefill_naive(q, k, v, kv_block_counts, kv_block_ids, block_size, scale=scale, attn_mask=attn_mask)
