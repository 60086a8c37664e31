"""What each KV head keeps: the prompt tokens its plan chooses when the prefill ends, and the caps a model puts on
its plans (its own sliding windows, its context)."""

from __future__ import annotations

import torch

from ..hf import text_config
from ..recipe import KVPlan

SNAPKV_POOL = 5  # SnapKV's 1-D average-pool width over token votes (keeps neighbours of strong tokens together)


def snapkv_votes(q_obs: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """SnapKV's importance of each key before the observation window.

    ``q_obs`` (B, Hkv, G, obs, D): the prompt's last ``obs`` queries of each KV head's query group; ``key``
    (B, Hkv, N, D), the window being its last ``obs`` keys. Each observation query's softmax runs over every key
    it can see (the window causally), so a query that looks mostly at its neighbours casts little weight on the
    rest; the weights on the keys before the window are summed over queries and group, then average-pooled.
    Returns (B, Hkv, N - obs) float32.
    """
    obs, n = q_obs.shape[-2], key.shape[2]
    scores = torch.matmul(q_obs.float(), key[:, :, None].float().transpose(-1, -2)) * scale  # (B, Hkv, G, obs, N)
    future = torch.arange(n, device=key.device)[None, :] > torch.arange(n - obs, n, device=key.device)[:, None]
    attn = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)[..., : n - obs]
    votes = attn.sum((2, 3))
    flat = votes.reshape(-1, 1, votes.shape[-1])
    pooled = torch.nn.functional.avg_pool1d(flat, SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2, count_include_pad=False)
    return pooled.view_as(votes)


def kept_prompt_tokens(plans: list[KVPlan], query: torch.Tensor | None, key: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """Per KV head, the indices of the prompt tokens its plan keeps, ascending ((B, T) or (T,) long).

    ``key`` (B, Hkv, N, D); ``query`` (B, Hq, N, D) post-RoPE, or None (SnapKV heads then keep the most recent
    tokens). A ``window`` head keeps its sinks and window, a ``snapkv`` head over its budget the tokens its observation
    window votes for plus the window, every other head everything. SnapKV heads that share an observation window
    vote in one batch (one score matrix, softmax and pooling for all of them)."""
    n = key.shape[2]
    device = key.device
    keep: list[torch.Tensor | None] = [None] * len(plans)
    snap: dict[int, list[int]] = {}
    for h, plan in enumerate(plans):
        if plan.policy == "window":
            sink, window = plan.sink_tokens, plan.window_tokens
            full = n <= sink + window
            keep[h] = torch.arange(n, device=device) if full else torch.cat([torch.arange(sink, device=device), torch.arange(n - window, n, device=device)])
        elif plan.policy == "snapkv" and n > plan.budget_tokens:
            if query is None:  # no queries reached us: keep the most recent tokens
                keep[h] = torch.arange(n - plan.budget_tokens, n, device=device)
            else:
                snap.setdefault(plan.window_tokens, []).append(h)
        else:
            keep[h] = torch.arange(n, device=device)
    group = query.shape[1] // key.shape[1] if query is not None else 1
    for obs, heads in snap.items():
        heads_t = torch.tensor(heads, device=device)
        q_obs = query[:, :, -obs:].reshape(query.shape[0], key.shape[1], group, obs, -1)[:, heads_t]  # (B, h, G, obs, D)
        votes = snapkv_votes(q_obs, key[:, heads_t], scale)  # (B, h, n - obs)
        budgets = [plans[h].budget_tokens - obs for h in heads]
        top = votes.topk(max(budgets), dim=-1).indices  # best first: each head's own top-k is a prefix
        recent = torch.arange(n - obs, n, device=device).expand(top.shape[0], -1)
        for i, (h, budget) in enumerate(zip(heads, budgets)):
            keep[h] = torch.cat([top[:, i, :budget].sort(-1).values, recent], dim=-1)
    return keep


def sliding_windows(config) -> list[int | None]:
    """Per layer, the model's own sliding attention window (None for full-attention layers)."""
    text = text_config(config)
    n_layers = text.num_hidden_layers
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return [None] * n_layers
    types = getattr(text, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n_layers


def respect_sliding_window(plans: list[KVPlan], window: int | None) -> list[KVPlan]:
    """A layer whose model attends only the last ``window`` tokens needs no more: its heads keep that window
    (or their own smaller sink + window)."""
    if window is None:
        return plans
    return [
        p if p.policy == "window" and p.sink_tokens + p.window_tokens <= window else KVPlan("window", window_tokens=window)
        for p in plans
    ]


def cap_to_context(plans: list[KVPlan], context: int | None) -> list[KVPlan]:
    """A window longer than the model's context keeps, at most, the context: a window head's ring is allocated whole
    when the prefill ends, so a recipe's window of 10^8 tokens would otherwise take its memory for nothing."""
    if not context:
        return plans
    return [
        KVPlan("window", sink_tokens=min(p.sink_tokens, context - 1), window_tokens=context - min(p.sink_tokens, context - 1))
        if p.policy == "window" and p.sink_tokens + p.window_tokens > context else p
        for p in plans
    ]
