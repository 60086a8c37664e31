"""The vertical-slash estimate read from query windows spread over the prompt, not only its end.

MInference estimates a head's verticals and slashes from the attention of the prompt's last 64 queries. Where the end
of the prompt is not like the rest (a question after a document, an instruction after repeated filler), those queries
show the pattern of the question, and the rest of the prompt is read through it: on eval's passkey prompts the
filler's own diagonals are missed. Here the estimate sums ``windows`` windows of ``last`` queries, ending evenly
spaced through the queries (the last window ends the prompt, as MInference's). Each window is the one-window estimate
over the keys up to its end (so the Triton kernel serves, one launch per window), padded to the prompt's blocks.

``spread_vertical_slash_scores(q, k, scale, block_size, n_blocks, windows, last, columns)``: ``q`` (B, H, Nq, D) every
query of the forward (a chunk's queries are the last Nq key positions), ``k`` (B, H_kv, N, D); the same tensors as
:func:`~patchattn.strategies.vs_estimate.vertical_slash_scores` returns. :func:`spread_scores_naive` is the reference:
one softmax over the chosen query rows, summed per key and per diagonal.
"""

from __future__ import annotations

import torch

from ...layout import num_blocks
from ...scores import grouped_scores
from .naive import block_sums


def window_ends(n_queries: int, windows: int, last: int) -> list[int]:
    """Where each window of ``min(last, n_queries)`` queries ends (exclusive, among the queries), ascending, without
    repeats: evenly spaced, the last at ``n_queries``; none before ``last`` (a short prompt has fewer windows)."""
    width = min(last, n_queries)
    return sorted({max(width, (n_queries * j) // windows) for j in range(1, windows + 1)})


def window_rows(n_queries: int, windows: int, last: int) -> torch.Tensor:
    """The query rows the windows read, one entry per window and row (rows in two windows come twice)."""
    width = min(last, n_queries)
    return torch.cat([torch.arange(end - width, end) for end in window_ends(n_queries, windows, last)])


def spread_vertical_slash_scores(q, k, scale: float, block_size: int, n_blocks: int, windows: int, last: int,
                                 columns: bool = False):
    from . import vertical_slash_scores

    n_q, n_keys = q.shape[2], k.shape[2]
    offset, width = n_keys - n_q, min(last, n_q)
    total = None
    # The last window first: it reads every key, so its scores are full size and the earlier (shorter) ones add into
    # their leading entries. One window is the end-only estimate, one call and nothing more.
    for end in reversed(window_ends(n_q, windows, last)):
        keys = offset + end
        part = vertical_slash_scores(q[:, :, end - width : end], k[:, :, :keys], scale, block_size,
                                     num_blocks(keys, block_size), columns)
        if total is None:
            total = part
        else:
            for into, x in zip(total, part):
                into[..., : x.shape[-1]].add_(x)
    return tuple(total)


def spread_scores_naive(q, k, scale: float, block_size: int, n_blocks: int, windows: int, last: int,
                        columns: bool = False):
    """Reference for :func:`spread_vertical_slash_scores`: the rows of :func:`window_rows` in one float32 softmax."""
    n_q, n_keys = q.shape[2], k.shape[2]
    rows = window_rows(n_q, windows, last).to(q.device)
    positions = rows + (n_keys - n_q)
    scores = grouped_scores(q[:, :, rows].float(), k.float(), scale)
    keys = torch.arange(n_keys, device=q.device)
    probs = torch.softmax(scores.masked_fill_(keys[None, :] > positions[:, None], float("-inf")), dim=-1)
    column = probs.sum(-2)
    diagonal = (positions[:, None] - keys[None, :]).clamp(min=0).expand_as(probs)
    per_offset = torch.zeros_like(column).scatter_add_(-1, diagonal.flatten(-2), probs.flatten(-2))
    vertical, slash = block_sums(column, block_size, n_blocks), block_sums(per_offset, block_size, n_blocks)
    return (vertical, slash, column) if columns else (vertical, slash)
