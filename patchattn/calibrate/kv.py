"""Score KV-cache plans per KV head from the calibration pass (decode budgets, as in TCA-Attention and AdaKV).

The last ``eval_rows`` positions of the calibration text stand in for generated tokens: the prompt ends at
``P = N - eval_rows``, each plan keeps some of the prompt's keys by its policy's own keep rule, the one the cache
applies (:mod:`patchattn.kv_policies`: a window keeps sinks and the latest tokens, SnapKV the tokens the prompt's last
``obs`` queries attend most, full everything), and every "generated" row attends what its plan kept plus the rows
after the prompt, less what the policy evicts (a window's ring). Against the exact causal attention of those rows,
per KV head (averaged over its query heads and the rows): the attention mass the plan keeps and the relative error of
the attention output. Cost is the share of the prompt's tokens the head holds. Nothing here materialises more than
(rows x N) scores per head.

Plain prose is a poor stand-in for generation that retrieves: its last rows mostly look nearby, so every head
seems compressible. :func:`with_copy_tail` therefore ends the calibration text with a passage repeated from its
middle (a cue the prompt ends on, then the rows that continue it), as a reader quoting the text would: heads that
copy (induction and duplicate-token heads, often in early layers) then show what they lose when the original
passage is dropped, as DuoAttention's retrieval calibration makes them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..cache import PAGE_TOKENS
from ..cache.quest import page_bounds, page_extremes
from ..kv_policies import POLICIES, KVPolicy, observation_votes
from ..recipe import KVPlan
from .allocate import allocate

EVAL_ROWS = 64
OBS_TOKENS = 32  # SnapKV's observation window


QUEST_PAGE_BUDGETS = (8, 16, 32, 64, 128, 256, 512, 1024)  # pages of PAGE_TOKENS read per decode step


@dataclass
class KVScores:
    cost: torch.Tensor  # (Hkv, C) float32: kept prompt tokens / prompt tokens
    kept_mass: torch.Tensor  # (Hkv, C) float32
    output_error: torch.Tensor  # (Hkv, C) float32
    quest_recall: torch.Tensor | None = None  # (Hkv, len(QUEST_PAGE_BUDGETS)): mass on the pages Quest reads


def with_copy_tail(input_ids: torch.Tensor, generator: torch.Generator, eval_rows: int = EVAL_ROWS, obs: int = OBS_TOKENS) -> torch.Tensor:
    """``input_ids`` (1, N) whose last ``obs + eval_rows`` tokens are replaced by a copy of a passage from the
    second eighth to the middle of the text, more than N/2 back (beyond every window candidate, so only a head that
    keeps or finds the passage continues it well): the prompt then ends on the passage's first ``obs`` tokens (what
    SnapKV observes) and the evaluated rows continue it."""
    n = input_ids.shape[1]
    span = obs + eval_rows
    lo, hi = n // 8, n // 2 - span
    if hi <= lo:
        return input_ids
    start = int(torch.randint(lo, hi, (1,), generator=generator))
    out = input_ids.clone()
    out[:, n - span :] = input_ids[:, start : start + span]
    return out


def kv_candidates(n_tokens: int, eval_rows: int = EVAL_ROWS, obs: int = OBS_TOKENS) -> list[KVPlan]:
    """Every registered policy's candidates (:meth:`KVPolicy.candidates`) on token sizes from 1/64 of the prompt up to
    a half (windows, SnapKV budgets), those that keep the whole prompt (full) last."""
    prompt = n_tokens - eval_rows
    sizes, size = [], max(64, prompt // 64)
    while size <= prompt // 2:
        sizes.append(size)
        size *= 2
    policies = [p for cls in POLICIES.values() for p in cls.candidates(prompt, sizes, obs)]
    return [KVPlan.of(p) for p in sorted(policies, key=lambda p: p.kept_tokens(prompt) >= prompt)]


def score_kv_layer(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    candidates: list[KVPlan],
    scale: float | None = None,
    eval_rows: int = EVAL_ROWS,
) -> KVScores:
    """``query`` (B, Hq, N, D), ``key``/``value`` (B, Hkv, N, D) post-RoPE, one layer."""
    batch, n_q_heads, n, dim = query.shape
    n_kv = key.shape[1]
    group = n_q_heads // n_kv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    prompt = n - eval_rows
    rows = torch.arange(prompt, n, device=query.device)
    positions = torch.arange(n, device=query.device)
    k = key.float().repeat_interleave(group, 1)
    v = value.float().repeat_interleave(group, 1)
    scores = torch.matmul(query[:, :, prompt:].float(), k.transpose(-1, -2)) * scale  # (B, Hq, R, N)
    causal = positions[None, :] <= rows[:, None]  # (R, N)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    dense_out = torch.matmul(probs, v)  # (B, Hq, R, D)
    dense_norm = dense_out.norm(dim=-1).clamp(min=1e-6)

    votes: dict[int, torch.Tensor] = {}  # per observation window: (B, Hkv, prompt - obs)
    costs, masses, errors = [], [], []
    for plan in candidates:
        policy = plan.build()
        ranked = None
        if policy.votes_needed(prompt) is not None:
            obs, depth = policy.votes_needed(prompt)
            if obs not in votes:
                votes[obs] = observation_votes(query[:, :, :prompt], key[:, :, :prompt], obs, scale)
            ranked = votes[obs].topk(depth, dim=-1).indices  # (B, Hkv, depth)
        keep = _held(policy, ranked, rows, prompt, n, batch, n_kv)  # (B, Hkv, R, N) bool
        keep_q = keep.repeat_interleave(group, 1)
        kept_probs = probs * keep_q
        kept = kept_probs.sum(-1)  # (B, Hq, R)
        sparse_out = torch.matmul(kept_probs, v) / kept.clamp(min=1e-12)[..., None]
        error = (sparse_out - dense_out).norm(dim=-1) / dense_norm
        masses.append(kept.view(batch, n_kv, group, -1).mean((0, 2, 3)))
        errors.append(error.view(batch, n_kv, group, -1).mean((0, 2, 3)))
        held = keep[:, :, 0, :prompt].float().sum(-1).mean(0) / prompt  # (Hkv,): prompt tokens held
        costs.append(held)
    stack = lambda xs: torch.stack(xs, -1).cpu()  # noqa: E731
    recall = quest_recall(query[:, :, prompt:], key, probs, prompt)
    return KVScores(stack(costs), stack(masses), stack(errors), recall)


def quest_recall(q_rows: torch.Tensor, key: torch.Tensor, probs: torch.Tensor, prompt: int) -> torch.Tensor:
    """Attention mass on the pages Quest would read, per KV head and page budget (Hkv, len(QUEST_PAGE_BUDGETS)).

    ``q_rows`` (B, Hq, R, D) the evaluated rows' queries, ``probs`` (B, Hq, R, N) their exact attention. Pages are
    the prompt's full pages (``PAGE_TOKENS`` each); a page's bound for a row is the cache's own
    (:func:`patchattn.cache.quest.page_bounds` over :func:`~patchattn.cache.quest.page_extremes`); the first page and
    every token after the last full prompt page (the newest, which the cache always reads) count as read, as in
    :func:`patchattn.cache.quest.pick_pages`. Unlike the cache, the budget counts neither those tokens nor pages that
    decoding adds: the recall is of the prompt's pages, at one fixed page set.
    """
    batch, n_q_heads, n_rows, dim = q_rows.shape
    n_kv = key.shape[1]
    group = n_q_heads // n_kv
    n_pages = prompt // PAGE_TOKENS
    kmin, kmax = page_extremes(key[:, :, : n_pages * PAGE_TOKENS].float(), n_pages * PAGE_TOKENS, PAGE_TOKENS)  # (B, Hkv, P, D)
    bound = page_bounds(q_rows.view(batch, n_kv, group, n_rows, dim), kmin, kmax)  # (B, Hkv, R, P), as the cache bounds
    bound[..., 0] = float("inf")
    page_mass = probs[..., : n_pages * PAGE_TOKENS].view(batch, n_q_heads, n_rows, n_pages, PAGE_TOKENS).sum(-1)
    page_mass = page_mass.view(batch, n_kv, group, n_rows, n_pages)
    always = probs[..., n_pages * PAGE_TOKENS :].sum(-1).view(batch, n_kv, group, n_rows)  # the newest tokens
    recalls = []
    for budget in QUEST_PAGE_BUDGETS:
        if budget >= n_pages:
            recalls.append(torch.ones(n_kv))
            continue
        chosen = bound.topk(budget, dim=-1).indices  # (B, Hkv, R, budget)
        mass = torch.gather(page_mass, -1, chosen[:, :, None].expand(-1, -1, group, -1, -1)).sum(-1) + always
        recalls.append(mass.mean((0, 2, 3)).cpu())
    return torch.stack(recalls, -1)


def pages_for_recall(recall: torch.Tensor, target: float) -> list[int]:
    """Per KV head, the smallest Quest page budget whose recall reaches ``target`` (0: read every page)."""
    chosen = []
    for row in recall.tolist():
        hits = [b for b, r in zip(QUEST_PAGE_BUDGETS, row) if r >= target]
        chosen.append(hits[0] if hits and hits[0] < QUEST_PAGE_BUDGETS[-1] else 0)
    return chosen


def _held(policy: KVPolicy, ranked: torch.Tensor | None, rows: torch.Tensor, prompt: int, n: int, batch: int, n_kv: int) -> torch.Tensor:
    """Which keys each evaluated row reads under ``policy``: (B, Hkv, R, N) bool (causal included). What the cache
    holds: the prompt tokens the policy's keep rule keeps when the prefill ends (``ranked``: the tokens its votes rank
    highest, for a rule that asks for them), then every token after the prompt, less what the policy has evicted by
    that row (a window's ring)."""
    device = rows.device
    positions = torch.arange(n, device=device)
    kept = policy.keep(prompt, device, ranked)  # (T,) or (B, Hkv, T)
    held = torch.zeros(batch, n_kv, n, dtype=torch.bool, device=device)
    held.scatter_(-1, kept.expand(batch, n_kv, -1), True)
    held[..., prompt:] = True
    held = held[:, :, None, :] & (positions[None, :] <= rows[:, None])
    evicted = policy.evicted(positions, rows)  # (R, N) or None
    return held if evicted is None else held & ~evicted


def allocate_kv(kv_scores: dict, candidates: list, n_layers: int, kv_budget: float, objective: str, decode_pages: int, decode_recall):
    """Choose one KV plan per KV head for ``kv_budget``; returns (plans per layer, calibration stats)."""
    cost = torch.stack([kv_scores[i].cost for i in range(n_layers)])  # (L, Hkv, C)
    mass = torch.stack([kv_scores[i].kept_mass for i in range(n_layers)])
    error = torch.stack([kv_scores[i].output_error for i in range(n_layers)])
    n_kv, n_cand = cost.shape[1], cost.shape[2]
    utility = mass if objective == "mass" else 1.0 - error
    choice = allocate(cost.view(-1, n_cand), utility.reshape(-1, n_cand), kv_budget).view(n_layers, n_kv)
    plans, quest_pages = [], []  # quest_pages: the pages of the heads that keep every token
    for li in range(n_layers):
        layer = []
        auto_pages = pages_for_recall(kv_scores[li].quest_recall, decode_recall) if decode_recall is not None else None
        for h in range(n_kv):
            plan = candidates[int(choice[li, h])]
            policy = plan.build()  # a candidate: it reads every page
            pages = plan.decode_pages
            if decode_pages and policy.reads_pages:
                pages = decode_pages
            elif auto_pages is not None and not policy.compresses:  # the recall was measured over the whole prompt
                pages = auto_pages[h]
            layer.append(dataclasses.replace(plan, decode_pages=pages))
            if not policy.compresses:
                quest_pages.append(pages)
        plans.append(layer)
    pick = lambda t: torch.gather(t, -1, choice[..., None]).squeeze(-1)  # noqa: E731
    policies: dict[str, int] = {}
    for layer in plans:
        for p in layer:
            policies[p.policy] = policies.get(p.policy, 0) + 1
    stats = {
        "budget": kv_budget,
        "achieved": round(float(pick(cost).mean()), 6),
        "mean_kept_mass": round(float(pick(mass).mean()), 6),
        "mean_output_error": round(float(pick(error).mean()), 6),
        "eval_rows": EVAL_ROWS,
        "eval_text": "calibration text ending on a passage repeated from its middle",
        "policies": policies,
        "decode_pages": decode_pages,
        "decode_recall": decode_recall,
        "quest_pages": quest_pages,
    }
    return plans, stats
