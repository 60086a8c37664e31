"""Quest (Tang et al., 2024) over the pooled cache: per-page key bounds, and the pages one decode query reads.

A page's bound on q.k is sum_d max(q_d * min_d, q_d * max_d) over its keys' per-dimension minima and maxima, the
largest over the KV head's query group. A Quest head reads the ``decode_pages`` pages of largest bound, its first page
(the attention sink) and its newest always among them (a budget of one page reads the newest, which holds the query's
own token); a head with no more pages than that reads them all.

The pick has fixed shapes, so a decode step asks the host nothing and looks the same from step to step: every Quest
head scores the same ``P`` candidate pages (the widest Quest head's capacity), pages past a head's valid count score
-inf, and one top-k serves all heads, each keeping the prefix of its own budget.
"""

from __future__ import annotations

import torch

from ..kernels.quest_bound import page_bounds, quest_bounds  # noqa: F401  (page_bounds: imported from here too)


def page_extremes(keys: torch.Tensor, n_tokens: int | list[int], page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per page, the minimum and maximum of each key dimension over the first ``n_tokens`` of ``keys`` (..., T, D):
    two (..., ceil(n_tokens / page), D) tensors; a partial last page bounds its valid keys only (exact in any dtype).
    ``n_tokens`` a list: one count per row of ``keys`` (B, T, D), the pages as many as the largest needs (a row's
    pages past its count bound nothing: +inf minima, -inf maxima). What the cache keeps per page and what
    calibration's Quest recall bounds with."""
    counts = torch.tensor(n_tokens).view(-1, 1)
    n_pages = -(-int(counts.max()) // page)
    region = keys[..., : n_pages * page, :]
    region = region.reshape(*region.shape[:-2], n_pages, page, region.shape[-1])
    filled = (torch.arange(n_pages * page) < counts).view(len(counts), n_pages, page, 1).to(region.device)
    return region.masked_fill(~filled, float("inf")).amin(-2), region.masked_fill(~filled, float("-inf")).amax(-2)


def rebuild_bounds(keys: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, first_page: int, n_tokens: list[int],
                   page: int) -> None:
    """Write the bounds of one head's pages: each row's ``n_tokens`` valid slots from pool page ``first_page`` on, in
    ``keys`` (B, C, D); a partial last page bounds its valid slots only. After the prefill or a reallocation."""
    lo, hi = page_extremes(keys[:, first_page * page :], n_tokens, page)
    page_min[:, first_page : first_page + lo.shape[1]] = lo
    page_max[:, first_page : first_page + hi.shape[1]] = hi


def update_bounds(page_min: torch.Tensor, page_max: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, page: int) -> None:
    """Fold one new token per row and Quest head (``key`` (B, h, D), written at pool ``slots`` (B, h) long) into its
    page's bounds; a token that opens a page replaces them."""
    pages = (slots // page)[..., None].expand_as(key)
    opens = (slots % page == 0)[..., None]
    page_min.scatter_(1, pages, torch.where(opens, key, torch.minimum(page_min.gather(1, pages), key)))
    page_max.scatter_(1, pages, torch.where(opens, key, torch.maximum(page_max.gather(1, pages), key)))


def pick_pages(
    query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor, candidates: torch.Tensor, n_pages: torch.Tensor,
    budgets: torch.Tensor, k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages each Quest head reads for one decode query.

    ``query`` (B, h, G, D): the Quest heads' query groups; ``page_min``/``page_max`` (B, C / page, D) the pool's page
    bounds; ``candidates`` (h, P) long: each head's first ``P`` pool pages (junk past its region, masked); ``n_pages``
    (B, h) or (h,) int32: its valid pages, per row or for all; ``budgets`` (h,) int32: its ``decode_pages``; ``k`` =
    min(max budget, P), fixed by the pool layout. Returns (pages (B, h, k) int32, ascending, each head's first
    ``counts[..., h]`` entries being its pick; counts, shaped as ``n_pages``, = min(n_pages, budget)). Tensor ops only."""
    n_candidates = candidates.shape[-1]
    bound = quest_bounds(query, page_min, page_max, candidates)  # (B, h, P)
    index = torch.arange(n_candidates, device=query.device)
    valid = n_pages[..., None].long()
    bound = bound.masked_fill(index == 0, torch.finfo(bound.dtype).max)  # the attention sink
    bound = bound.masked_fill(index == valid - 1, float("inf"))  # the newest tokens, first of all
    bound = bound.masked_fill(index >= valid, float("-inf"))
    top = bound.topk(k, dim=-1).indices  # best first: each head's own pick is the prefix of its budget
    past_budget = torch.arange(k, device=query.device) >= budgets[:, None]
    top = top.masked_fill(past_budget, n_candidates).sort(-1).values  # ascending; past-budget entries last
    pages = candidates.expand(top.shape[0], -1, -1).gather(-1, top.clamp(max=n_candidates - 1))
    return pages.to(torch.int32), torch.minimum(n_pages, budgets)
