"""Choose one candidate per head: the most kept attention mass for a global density budget.

A multiple-choice knapsack over all heads of all layers, solved the MoA way: a Lagrange multiplier on
density picks each head's best trade-off, bisection finds the multiplier that meets the budget, and a
greedy pass spends what budget is left on the upgrades with the best mass per density.
"""

from __future__ import annotations

import torch


def _choose(density: torch.Tensor, mass: torch.Tensor, lam: float) -> torch.Tensor:
    # Ties (equal utility) go to the sparser candidate.
    utility = mass - lam * density - 1e-9 * density
    return utility.argmax(-1)


def allocate(density: torch.Tensor, mass: torch.Tensor, target_density: float, iters: int = 60) -> torch.Tensor:
    """``density``, ``mass``: (heads, candidates). Returns chosen candidate index per head (heads,).

    The chosen mean density is <= ``target_density`` whenever any choice can reach it (else the sparsest).
    """
    heads = density.shape[0]
    budget = target_density * heads
    lo, hi = 0.0, 1.0
    while density.gather(-1, _choose(density, mass, hi)[:, None]).sum() > budget and hi < 1e6:
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        if density.gather(-1, _choose(density, mass, mid)[:, None]).sum() > budget:
            lo = mid
        else:
            hi = mid
    choice = _choose(density, mass, hi)

    # Greedy fill: best mass gained per density spent, while it fits.
    heads_idx = torch.arange(heads)
    spent = density[heads_idx, choice].sum()
    while True:
        d_gain = density - density[heads_idx, choice][:, None]
        m_gain = mass - mass[heads_idx, choice][:, None]
        ok = (d_gain > 0) & (m_gain > 0) & (spent + d_gain <= budget + 1e-9)
        if not ok.any():
            break
        ratio = torch.where(ok, m_gain / d_gain.clamp(min=1e-12), torch.full_like(m_gain, -1.0))
        flat = int(ratio.argmax())
        h, c = divmod(flat, density.shape[1])
        spent = spent + d_gain[h, c]
        choice[h] = c
    return choice
