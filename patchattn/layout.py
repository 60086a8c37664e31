"""Block layouts: which key blocks each query block reads.

A layout is a boolean tensor ``keep`` of shape (B, H, n_q_blocks, n_k_blocks); query block ``i`` holds
tokens ``[i * block_size, (i + 1) * block_size)`` (the last one may be short), likewise for keys. Every
strategy produces one; the kernels consume its ragged form (``kv_block_counts`` + ``kv_block_ids``).
Layouts are causal (no key block after the query block) and always keep the diagonal block, so no query
row is ever left with nothing to attend to. The last query block always reads every block: it holds the end
of the prompt (the question, the instruction), whose attention produces the first generated token, and it
costs one row of blocks (1/n of the work).
"""

from __future__ import annotations

import torch

BLOCK_SIZES = (16, 32, 64, 128, 256)  # the block sizes the kernels and recipes take


def num_blocks(n_tokens: int, block_size: int) -> int:
    return (n_tokens + block_size - 1) // block_size


def causal_blocks(n_blocks: int, device=None) -> torch.Tensor:
    """(n_blocks, n_blocks) bool, True where key block <= query block."""
    idx = torch.arange(n_blocks, device=device)
    return idx[:, None] >= idx[None, :]


def diagonal_blocks(n_blocks: int, device=None) -> torch.Tensor:
    return torch.eye(n_blocks, dtype=torch.bool, device=device)


def window_blocks(window: int, block_size: int) -> int:
    """How many key blocks back (the diagonal included) a query block can see through a sliding window of ``window``
    positions (query p sees keys > p - window): the blocks holding a key inside its first query's window. 0: none."""
    return 0 if not window else (window + block_size - 2) // block_size + 1


def finalize(keep: torch.Tensor, dense_rows: int = 0, window_rows: int = 0) -> torch.Tensor:
    """Clip a layout to causal blocks, force the diagonal in, and make the last query block dense, and the first
    ``dense_rows`` query blocks too (a recipe's dense prefix). ``window_rows`` > 0 (:func:`window_blocks`, a model's
    sliding window): row i keeps only key blocks j > i - window_rows."""
    n = keep.shape[-1]
    keep = keep.clone()
    keep[..., -1, :] = True
    if dense_rows > 0:
        keep[..., :dense_rows, :] = True
    allowed = causal_blocks(n, keep.device)
    if window_rows > 0:
        idx = torch.arange(n, device=keep.device)
        allowed = allowed & (idx[None, :] > idx[:, None] - window_rows)
    return (keep & allowed) | diagonal_blocks(n, keep.device)


def to_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged form of a layout.

    Returns ``kv_block_counts`` (B, H, n_q_blocks) int32 and ``kv_block_ids`` (B, H, n_q_blocks, max_count)
    int32: the first ``count`` ids of each row are the kept key blocks in ascending order; the rest are
    padding (0) that a consumer must not read.
    """
    counts, ids, _ = to_ragged(keep)
    return counts, ids


def to_ragged(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`to_indices` plus the layout's density (kept / causal blocks), read in the same device sync as the
    longest row: the kernels pick their tile shapes by it."""
    counts = keep.sum(-1, dtype=torch.int32)
    n_k = keep.shape[-1]
    if keep.numel():
        longest, total = torch.stack([counts.max(), counts.sum()]).tolist()
        max_count, density = max(int(longest), 1), total / (counts.numel() * (n_k + 1) / 2)
    else:
        max_count, density = 1, 0.0
    # Kept blocks sort first (by id), dropped ones after them; keep the first max_count columns.
    block_id = torch.arange(n_k, device=keep.device, dtype=torch.int32)
    order_key = torch.where(keep, block_id, block_id + n_k)
    ids = torch.sort(order_key, dim=-1).values[..., :max_count]
    valid = torch.arange(max_count, device=keep.device) < counts[..., None]
    ids = torch.where(valid, ids, torch.zeros_like(ids))
    return counts, ids.contiguous(), density


def from_indices(counts: torch.Tensor, ids: torch.Tensor, n_k_blocks: int) -> torch.Tensor:
    """Inverse of :func:`to_indices`."""
    valid = torch.arange(ids.shape[-1], device=ids.device) < counts[..., None]
    hits = torch.zeros(*ids.shape[:-1], n_k_blocks, dtype=torch.int32, device=ids.device)
    hits.scatter_add_(-1, ids.long(), valid.to(torch.int32))
    return hits > 0


def column_counts(columns: torch.Tensor, n_q_blocks: int, block_size: int, dense_rows: int = 0) -> torch.Tensor:
    """How many of each head's token columns each query block reads: (B, H, n_q_blocks) int32.

    ``columns`` (B, H, C) ascending key positions padded with anything >= the sequence length (a strategy's
    :meth:`~patchattn.strategies.Strategy.columns_heads`). Query block ``i`` reads the columns before its first
    token (``< i * block_size``: its own block is in the layout); the last block and the first ``dense_rows``
    blocks read every block, so no column. A consumer skips columns whose block its block layout already holds.
    :func:`column_reads` pairs these counts with the block layout, so that no query block computes more than dense."""
    batch, heads, _ = columns.shape
    starts = torch.arange(n_q_blocks, device=columns.device, dtype=columns.dtype) * block_size
    counts = torch.searchsorted(columns.contiguous(), starts.expand(batch, heads, n_q_blocks).contiguous(), out_int32=True)
    counts[..., -1] = 0
    if dense_rows > 0:
        counts[..., :dense_rows] = 0
    return counts


def column_tiles(counts: torch.Tensor, block_size: int) -> torch.Tensor:
    """The work of token columns in blocks: each query block gathers its columns ``block_size`` at a time."""
    return (counts + block_size - 1) // block_size


def column_reads(keep: torch.Tensor, columns: torch.Tensor, block_size: int, dense_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A block layout with token columns as the kernels run it: ``(keep, counts)``, ``counts`` the
    :func:`column_counts` of each query block, except where a query block's blocks and :func:`column_tiles` would cost
    at least as much as all its causal blocks: that block reads all of them instead, and no column.

    The kernels gather every column a count names (those in a held block are masked, not skipped), so without this a
    short sequence, whose early query blocks hold most of their few causal blocks through the sink and the diagonals,
    would compute more than dense attention; with it no query block computes more than its causal blocks, and such a
    block loses no mass. ``keep`` (B, H, n, n) raw or :func:`finalize`-d (a raw one is finished afterwards; its
    last query block and first ``dense_rows`` read no column either way). No device sync."""
    n = keep.shape[-1]
    counts = column_counts(columns, n, block_size, dense_rows)
    causal = causal_blocks(n, keep.device)
    held = ((keep & causal) | diagonal_blocks(n, keep.device)).sum(-1, dtype=torch.int32)  # blocks once finished
    dense = held + column_tiles(counts, block_size) >= torch.arange(1, n + 1, device=keep.device, dtype=torch.int32)
    return keep | (dense[..., None] & causal), torch.where(dense, 0, counts)


def block_density(keep: torch.Tensor) -> torch.Tensor:
    """Fraction of causal blocks kept, per (B, H): shape (B, H) float32."""
    n = keep.shape[-1]
    causal = causal_blocks(n, keep.device)
    kept = (keep & causal).sum((-1, -2), dtype=torch.float32)
    return kept / causal.sum().float()


def token_mask(
    keep: torch.Tensor, n_q: int, n_k: int, block_size: int, columns: torch.Tensor | None = None, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Expand a layout to a token-level bool mask (B, H, n_q, n_k), causal included; with ``columns`` and their
    :func:`column_counts`, each query block's first ``counts`` columns too. For tests and references."""
    full = keep.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :n_q, :n_k]
    q_pos = torch.arange(n_q, device=keep.device)[:, None] + (n_k - n_q)
    k_pos = torch.arange(n_k, device=keep.device)[None, :]
    if columns is not None:
        rank = torch.arange(columns.shape[-1], device=keep.device)
        row_counts = counts.repeat_interleave(block_size, -1)[..., :n_q]  # (B, H, n_q)
        read = (rank < row_counts[..., None]) & (columns[..., None, :] < n_k)  # (B, H, n_q, C)
        extra = torch.zeros(*columns.shape[:2], n_q, n_k + 1, dtype=torch.bool, device=keep.device)
        extra.scatter_(-1, torch.where(read, columns[..., None, :].long(), n_k).expand(-1, -1, n_q, -1), True)
        full = full | extra[..., :n_k]
    return full & (k_pos <= q_pos)
