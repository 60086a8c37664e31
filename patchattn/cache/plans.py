"""What each KV head keeps: the prompt tokens its policy's keep rule chooses when the prefill ends (SnapKV heads voting
in batches), and the caps a model puts on its plans (its own sliding windows, its context)."""

from __future__ import annotations

import math

import torch

from ..hf import sliding_windows  # noqa: F401  (re-exported: the cache's own name for it)
from ..kv_policies import KVPolicy, observation_votes
from ..recipe import KVPlan


def kept_prompt_tokens(plans: list[KVPlan | KVPolicy], query: torch.Tensor | None, key: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """Per KV head, the indices of the prompt tokens its policy keeps (:meth:`KVPolicy.keep`), ascending ((B, T) or
    (T,) long).

    ``key`` (B, Hkv, N, D); ``query`` (B, Hq, N, D) post-RoPE, or None (no votes: SnapKV heads then keep the most
    recent tokens). Heads whose keep rule ranks tokens by the votes of the same observation window vote in one batch
    (one score matrix, softmax and pooling for all of them), ranked once as deep as the deepest needs."""
    policies = [p.build() if isinstance(p, KVPlan) else p for p in plans]
    n = key.shape[2]
    device = key.device
    keep: list[torch.Tensor | None] = [None] * len(policies)
    voters: dict[int, list[int]] = {}
    for h, policy in enumerate(policies):
        needed = policy.votes_needed(n) if query is not None else None
        if needed is None:
            keep[h] = policy.keep(n, device)
        else:
            voters.setdefault(needed[0], []).append(h)
    for obs, heads in voters.items():
        votes = observation_votes(query, key, obs, scale, torch.tensor(heads, device=device))  # (B, h, n - obs)
        depth = max(policies[h].votes_needed(n)[1] for h in heads)
        top = votes.topk(depth, dim=-1).indices  # best first: each head's own top-k is a prefix
        for i, h in enumerate(heads):
            keep[h] = policies[h].keep(n, device, top[:, i])
    return keep


def respect_sliding_window(plans: list[KVPlan], window: int | None) -> list[KVPlan]:
    """A layer whose model attends only the last ``window`` tokens needs no more: its heads keep that window
    (or their own smaller sink + window)."""
    if window is None:
        return plans
    return [p if (p.build().span_tokens or math.inf) <= window else KVPlan("window", window_tokens=window) for p in plans]


def cap_to_context(plans: list[KVPlan], context: int | None) -> list[KVPlan]:
    """A window longer than the model's context keeps, at most, the context: a window head's ring is allocated whole
    when the prefill ends, so a recipe's window of 10^8 tokens would otherwise take its memory for nothing."""
    if not context:
        return plans
    capped = []
    for p in plans:
        if (p.build().span_tokens or 0) > context:  # a window head: its sinks stay (all but one at most), its window shrinks
            sink = min(p.sink_tokens, context - 1)
            p = KVPlan("window", sink_tokens=sink, window_tokens=context - sink)
        capped.append(p)
    return capped
