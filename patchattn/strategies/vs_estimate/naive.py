"""Reference for the vertical-slash estimate: the attention of the last queries, summed per key block (vertical) and
per block of diagonal offsets (slash), in float32 PyTorch.

``vertical_slash_scores_naive(q_last, k, scale, block_size, n_blocks) -> (vertical, slash)``:

* ``q_last`` (B, H, L, D): the last L queries (positions ``N - L .. N - 1``); ``k`` (B, H_kv, N, D), H a multiple of
  H_kv (query head ``h`` reads key head ``h // (H // H_kv)``).
* ``vertical`` (B, H, n_blocks): sum over the L queries of their softmax probabilities, per block of key positions.
* ``slash`` (B, H, n_blocks): the same probabilities per block of offsets ``query position - key position``.
* with ``columns=True`` a third tensor, ``column`` (B, H, N): the vertical score of every key position (what the
  token-granular vertical-slash strategy ranks); ``vertical`` is its sum per block.
"""

from __future__ import annotations

import torch

from ...scores import grouped_scores


def block_sums(values: torch.Tensor, block_size: int, n_blocks: int) -> torch.Tensor:
    pad = n_blocks * block_size - values.shape[-1]
    values = torch.nn.functional.pad(values, (0, pad))
    return values.view(*values.shape[:-1], n_blocks, block_size).sum(-1)


def last_query_probs(q_last: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, L, N) float32 causal softmax of the last L queries over all N keys (GQA without expanding the keys)."""
    last, n = q_last.shape[2], k.shape[2]
    scores = grouped_scores(q_last, k, scale)
    q_pos = torch.arange(n - last, n, device=q_last.device)
    future = torch.arange(n, device=q_last.device)[None, :] > q_pos[:, None]
    return torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1)


def vertical_slash_scores_naive(q_last, k, scale: float, block_size: int, n_blocks: int, columns: bool = False):
    n, last = k.shape[2], q_last.shape[2]
    probs = last_query_probs(q_last, k, scale)
    column = probs.sum(-2)
    vertical = block_sums(column, block_size, n_blocks)
    # Slash: probability mass per diagonal offset o = q_pos - k_pos, gathered (no atomics) as
    # sum_i P[i, q_pos_i - o], then summed per block of offsets.
    q_pos = torch.arange(n - last, n, device=q_last.device)
    key_of = q_pos[:, None] - torch.arange(n, device=q_last.device)[None, :]  # (L, N): key position at offset o
    on_diag = torch.gather(probs, -1, key_of.clamp(min=0).expand_as(probs)).masked_fill_(key_of < 0, 0.0)
    slash = block_sums(on_diag.sum(-2), block_size, n_blocks)
    return (vertical, slash, column) if columns else (vertical, slash)
