"""A loss bound that covers the KV plans too: held-out text decoded through the head-budgeted cache.

A recipe's KV plans act while it generates, so their loss is measured as generation meets it: each held-out window of
the calibration length is prefilled up to its last :data:`CONTINUATION_TOKENS` tokens (sparse, as the recipe's prefill
plans say), and those tokens are fed one after another through the cache the recipe decodes with (the budgeted one,
where its plans compress the prompt). The loss is the rise of their perplexity over the dense model's, on the same
windows, with the full cache. With ``--max-loss``, ``--kv-budget`` is the smallest share of the cache to try: when the
plans allocated to it lose more than the bound, the budget is raised by bisection until they do not (every budget
allocates the same KV scores again; no new scoring).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import torch

from ..patch import patched
from ..recipe import Recipe
from .probe import continuation_logits
from .search import LossBound, search_target
from .verify import VERIFY_WINDOWS, HeldOut

logger = logging.getLogger(__name__)

CONTINUATION_TOKENS = 256  # tokens decoded through the cache at the end of each window
KV_SEARCH_TOLERANCE = 0.05  # the budget's resolution
KV_SEARCH_MAX_STEPS = 5


@torch.no_grad()
def continuation_nll(model, window: torch.Tensor, n_cont: int) -> float:
    """Summed negative log-likelihood of ``window``'s last ``n_cont`` tokens, fed through the cache after the rest is
    prefilled (as a greedy decode reads them, one token after another)."""
    prompt, cont = window[:, :-n_cont], window[:, -n_cont:]
    logits = continuation_logits(model, model(prompt, use_cache=True, logits_to_keep=1), cont)
    return float(torch.nn.functional.cross_entropy(logits, cont[0].to(logits.device), reduction="sum"))


class DecodeVerifier:
    """The perplexity rise of a recipe's decoded continuations over the dense model's, on held-out windows of
    ``length`` tokens (:data:`VERIFY_WINDOWS` of them)."""

    def __init__(self, model, held: HeldOut, length: int, n_cont: int = CONTINUATION_TOKENS):
        device = model.get_input_embeddings().weight.device
        self.model, self.n_cont = model, min(n_cont, length // 4)
        self.windows = [w.to(device) for w in held.windows(length, VERIFY_WINDOWS)]
        self._dense: float | None = None

    def _sum(self) -> float:
        return sum(continuation_nll(self.model, w, self.n_cont) for w in self.windows)

    def loss(self, recipe: Recipe) -> float:
        if self._dense is None:
            self._dense = self._sum()
        with patched(self.model, recipe, backend="sparse"):
            sparse = self._sum()
        return math.exp((sparse - self._dense) / (self.n_cont * len(self.windows))) - 1.0


def search_kv_budget(
    verifier: DecodeVerifier, recipe: Recipe, allocate_at: Callable[[float], tuple[list, dict]], kv_budget: float,
    bound: LossBound,
) -> tuple[list, dict, list[dict]]:
    """The smallest KV budget from ``kv_budget`` up whose plans (``allocate_at(budget)``: plans, statistics), with
    ``recipe``'s prefill, keep the decoded continuation within ``bound``: (plans, statistics, the search's record).
    When none does, the full cache (budget 1), said in the log."""
    tried: dict[float, tuple[list, dict]] = {}

    def measure(compression: float) -> tuple[float, float]:
        tried[compression] = allocate_at(1.0 - compression)
        loss = verifier.loss(dataclasses.replace(recipe, kv_layers=tried[compression][0]))
        return 1.0 - tried[compression][1]["achieved"], loss

    compression, steps = search_target(measure, bound.ppl, high=1.0 - kv_budget, tolerance=KV_SEARCH_TOLERANCE,
                                       max_steps=KV_SEARCH_MAX_STEPS, high_first=True)
    if compression == 0.0:
        logger.warning("no KV budget from %s up kept the decoded text within %s: the recipe keeps the whole cache", kv_budget, bound)
        tried[0.0] = allocate_at(1.0)
    plans, stats = tried[compression]
    record = [{"budget": round(1.0 - s.target, 6), "kept": round(1.0 - s.sparsity, 6), "ppl_loss": round(s.loss, 6),
               "within": s.within} for s in steps]
    return plans, {**stats, "asked_budget": kv_budget, "continuation_tokens": verifier.n_cont,
                   "windows": len(verifier.windows)}, record
