"""Quest's bound on q.k over a page: the PyTorch reference (and the CPU path) of :mod:`.kernel`."""

from __future__ import annotations

import torch


def page_bounds(query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
    """Quest's bound on q.k over each page: ``query`` (B, h, G, *, D) each KV head's query group (any row dimensions
    after it), ``page_min``/``page_max`` (B, h, P, D) the pages' key extremes; returns (B, h, *, P) float32, the
    largest over the group of sum_d max(q_d min_d, q_d max_d)."""
    q = query.float().unsqueeze(-2)  # (B, h, G, *, 1, D)
    rows = (1,) * (query.dim() - 4)
    lo = page_min.float().view(*page_min.shape[:2], 1, *rows, *page_min.shape[2:])
    hi = page_max.float().view(*page_max.shape[:2], 1, *rows, *page_max.shape[2:])
    return torch.maximum(q * lo, q * hi).sum(-1).amax(2)


def quest_bounds_naive(query, page_min, page_max, candidates):
    """The bounds of the pages ``candidates`` (h, P) names, for ``query`` (B, h, G, D) and the pool's page extremes
    (B, n_pool_pages, D): the candidates' extremes gathered, then :func:`page_bounds`. (B, h, P) float32."""
    return page_bounds(query, page_min[:, candidates], page_max[:, candidates])
