"""Verify a recipe end to end: its perplexity against the dense model's, on held-out windows of the calibration text.

The calibration text is tokenised once; the first ``seq_len`` tokens are scored, the rest is held out. Every length
is verified on as many tokens as :data:`VERIFY_WINDOWS` windows of the calibration length hold (on SmolLM2 at 4K the
loss of one recipe ranged from +1.9% to +5.5% over four windows: one window is not a measurement), each window starting with the tokens the tokenizer puts first (a BOS), as a prompt would. The dense model's
log-likelihoods are computed once per window and reused for every candidate recipe, and a recipe measured once at a
length is not measured again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..errors import OptionError
from ..patch import patched
from ..recipe import Recipe
from ..stats import record_sparsity

logger = logging.getLogger(__name__)

VERIFY_WINDOWS = 4  # windows of the calibration length each length is verified on (as `eval --ppl-windows 4` reads)
MIN_VERIFY_TOKENS = 1024  # the shortest length verified, unless the recipe's min_sparse_tokens is longer


@dataclass(frozen=True)
class HeldOut:
    """Text the scoring never read: ``ids`` (1, M) and the ``prefix`` (1, P) put before every window."""

    ids: torch.Tensor
    prefix: torch.Tensor
    source: str  # what the windows come from, for the recipe and the table

    def windows(self, length: int, count: int) -> list[torch.Tensor]:
        """Up to ``count`` disjoint windows of ``length`` tokens (prefix included), in text order (at least one, the
        text repeated if it is shorter than one window)."""
        body = length - self.prefix.shape[1]
        n = self.ids.shape[1]
        if n < body:  # a short held-out part: tiled, said by the caller's source
            reps = -(-body // max(n, 1))
            return [torch.cat([self.prefix, self.ids.repeat(1, reps)[:, :body]], dim=1)]
        return [torch.cat([self.prefix, self.ids[:, i * body : (i + 1) * body]], dim=1) for i in range(min(count, n // body))]


def split_text(tokenizer, text: str, seq_len: int, limit: int | None = None, name: str = "the calibration text") -> tuple[torch.Tensor, HeldOut]:
    """(the first ``seq_len`` tokens of ``text`` to score, the rest held out for verification). ``limit``: the model's
    context. A text with fewer than ``seq_len`` tokens is refused (naming it ``name``); one with none left over is
    verified on its own scored tokens, and the held-out source says so."""
    if limit is not None and seq_len > limit:
        raise OptionError("seq_len", f"{seq_len} exceeds the model's context of {limit} tokens; use a length <= {limit}")
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt").input_ids
    if ids.shape[1] < seq_len:
        raise OptionError("seq_len", f"{seq_len} is more than {name}'s {ids.shape[1]} tokens; give a longer text or a shorter seq_len")
    prefix = special_prefix(tokenizer)
    held = ids[:, seq_len:]
    if held.shape[1] >= seq_len - prefix.shape[1]:
        return ids[:, :seq_len], HeldOut(held, prefix, f"{held.shape[1]} held-out tokens of the calibration text")
    return ids[:, :seq_len], HeldOut(ids[:, prefix.shape[1] : seq_len], prefix, "the scored calibration tokens themselves (the text has too few left over)")


def special_prefix(tokenizer) -> torch.Tensor:
    """(1, P): what the tokenizer puts before text (a BOS), which every verification window starts with."""
    from ..eval.tasks import _special_prefix

    return torch.tensor([_special_prefix(tokenizer)], dtype=torch.long).reshape(1, -1)


def lengths_to_verify(seq_len: int, min_sparse_tokens: int = 0, block_size: int = 64) -> list[int]:
    """The calibration length, then halves of it down to the recipe's ``min_sparse_tokens`` or
    :data:`MIN_VERIFY_TOKENS` (the longer), and never under four blocks; longest first."""
    floor = max(min_sparse_tokens, MIN_VERIFY_TOKENS, 4 * block_size)
    lengths, length = [seq_len], seq_len // 2
    while length >= floor:
        lengths.append(length)
        length //= 2
    return lengths


class Verifier:
    """Measures a recipe's perplexity rise over the dense model on :class:`HeldOut` windows, ``tokens`` tokens of them at
    every length; None: ``windows`` windows of the first length measured (the calibration length: the search measures
    it first)."""

    def __init__(self, model, held: HeldOut, tokens: int | None = None, windows: int = VERIFY_WINDOWS):
        self.model, self.held, self.tokens, self.n_windows = model, held, tokens, windows
        self._dense: dict[int, list[float]] = {}  # length -> dense NLL sum per window
        self._measured: dict[tuple[str, int], tuple[float, float | None, int]] = {}  # (plan hash, length) -> loss

    @property
    def source(self) -> str:
        """What the windows come from, for the recipe and the table."""
        return self.held.source

    def loss_detail(self) -> dict:
        """What the last :meth:`loss` measured beyond its tuple, for the record (nothing here; per kind in
        :class:`~patchattn.calibrate.kinds.WorstKind`)."""
        return {}

    def _windows(self, length: int) -> list[torch.Tensor]:
        device = self.model.get_input_embeddings().weight.device
        if self.tokens is None:
            self.tokens = length * self.n_windows
        return [w.to(device) for w in self.held.windows(length, max(1, -(-self.tokens // length)))]

    def _nll_sums(self, windows: list[torch.Tensor]) -> list[float]:
        from ..eval.tasks import token_nll

        return [float(token_nll(self.model, w).double().sum()) for w in windows]

    def loss(self, recipe: Recipe, length: int, bound: float | None = None) -> tuple[float, float | None, int]:
        """(relative perplexity rise, the prefill sparsity it ran at, tokens scored) of ``recipe`` at ``length``.
        ``bound``: the loss that decides (a verifier of several texts may stop once one text is over it)."""
        key = (recipe.plan_hash(), length)
        if key not in self._measured:
            self._measured[key] = self._loss(recipe, length)
        return self._measured[key]

    def _loss(self, recipe: Recipe, length: int) -> tuple[float, float | None, int]:
        windows = self._windows(length)
        if length not in self._dense:
            self._dense[length] = self._nll_sums(windows)
        with patched(self.model, recipe, backend="sparse"), record_sparsity() as record:
            sparse = self._nll_sums(windows)
        scored = sum(w.shape[1] - 1 for w in windows)
        rise = math.exp((sum(sparse) - sum(self._dense[length])) / scored) - 1.0
        return rise, record.sparsity, scored

    def verify_lengths(self, recipe: Recipe, lengths: list[int], bound: float) -> tuple[list[dict], int]:
        """Each length's measured loss (longest first) and the shortest length from which every longer one is within
        ``bound`` (the recipe's new ``min_sparse_tokens``; the longest length plus one when even it is not)."""
        rows, valid_from, all_within = [], lengths[0] + 1, True
        for length in lengths:
            rise, sparsity, scored = self.loss(recipe, length, bound)
            within = rise <= bound
            all_within = all_within and within
            if all_within:
                valid_from = length
            rows.append({"length": length, "ppl_loss": round(rise, 6), "sparsity": None if sparsity is None else round(sparsity, 6),
                         "tokens": scored, "within": within, **self.loss_detail()})
            logger.info("verified at %d tokens: perplexity %+.2f%% (sparsity %s)", length, 100 * rise, sparsity)
        for row in rows:
            row["sparse"] = row["length"] >= valid_from
        return rows, valid_from
