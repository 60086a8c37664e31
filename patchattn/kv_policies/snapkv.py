"""SnapKV heads (Li et al., 2024): ``budget_tokens`` prompt tokens, those the prompt's last ``window_tokens`` queries
(the observation window) attend most, the window among them; then every generated token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import KVPolicy
from .registry import register

SNAPKV_POOL = 5  # SnapKV's 1-D average-pool width over token votes (keeps neighbours of strong tokens together)


@register
@dataclass(frozen=True)
class SnapKV(KVPolicy):
    name: ClassVar[str] = "snapkv"
    budget_tokens: int = 0
    window_tokens: int = 0  # the observation window

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.window_tokens <= self.budget_tokens:
            raise ValueError("a snapkv KV plan needs 0 < window_tokens <= budget_tokens")

    def kept_tokens(self, n_tokens: int) -> int:
        return min(n_tokens, self.budget_tokens)

    def votes_needed(self, n_tokens: int) -> tuple[int, int] | None:
        return (self.window_tokens, self.budget_tokens - self.window_tokens) if n_tokens > self.budget_tokens else None

    def keep(self, n_tokens: int, device, ranked: torch.Tensor | None = None) -> torch.Tensor:
        """The top-voted tokens and the observation window; with no votes (no queries reached the cache), the most
        recent ``budget_tokens``."""
        obs, budget = self.window_tokens, self.budget_tokens
        if n_tokens <= budget:
            return torch.arange(n_tokens, device=device)
        if ranked is None:
            return torch.arange(n_tokens - budget, n_tokens, device=device)
        recent = torch.arange(n_tokens - obs, n_tokens, device=device).expand(*ranked.shape[:-1], -1)
        return torch.cat([ranked[..., : budget - obs].sort(-1).values, recent], dim=-1)

    @classmethod
    def candidates(cls, prompt_tokens: int, sizes: list[int], obs_tokens: int) -> list[KVPolicy]:
        return [cls(budget_tokens=s, window_tokens=obs_tokens) for s in sizes if obs_tokens < s < prompt_tokens]


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


def observation_votes(query: torch.Tensor, key: torch.Tensor, obs: int, scale: float, heads: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`snapkv_votes` of a prompt's last ``obs`` queries: ``query`` (B, Hq, N, D), ``key`` (B, Hkv, N, D), the
    prompt and nothing after it; ``heads``: the KV heads to score (None: all). Returns (B, h, N - obs) float32."""
    n_kv = key.shape[1]
    q_obs = query[:, :, -obs:].reshape(query.shape[0], n_kv, query.shape[1] // n_kv, obs, -1)  # (B, Hkv, G, obs, D)
    if heads is not None:
        q_obs, key = q_obs[:, heads], key[:, heads]
    return snapkv_votes(q_obs, key, scale)
