"""Calibration on several kinds of text: each scored in its own pass, one robust allocation, the loss bound per kind.

Recipes calibrated on prose lose far more on code and technical documentation (SmolLM2: +6-14% perplexity there
against +2.5% on prose). Given texts of several kinds (``{kind: (1, N) ids}``, one length for all), calibration scores
each in its own forward pass and allocates on a robust utility per head and candidate: the worst over the kinds
(``robust="worst"``, a head keeps the budget its most demanding kind needs) or their mean (``"mean"``). The density
is the mean over kinds (only ``block_topk``'s depends on the text). With a loss bound, each kind is verified on its
own held-out windows and a candidate's loss is the worst kind's (:class:`WorstKind`), so the bound holds on every kind.

That bound holds on the kinds calibration read, not on the next one: on SmolLM2 at 8K a recipe calibrated on prose and
code to +2.2% read +3.3% to +4.4% on docs, dialogue and structured text (``examples/kinds-smollm2-8k/v4``). With
``verify="unseen-kind"`` (what ``"auto"``, the default, runs for a loss bound on several kinds) each kind is verified
instead on a recipe allocated without it (the other kinds' robust scores at the same target, :class:`UnseenKind`): the
loss a kind shows when calibration never read it, which is what a user's text of yet another kind meets. Where that is
within the bound the kind is also measured under the recipe written (allocated on every kind), and the larger loss
counts, so the recipe written holds on the kinds it read too; up to twice the measurements of ``verify="held-out"``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from ..errors import OptionError
from .verify import VERIFY_WINDOWS, HeldOut, Verifier

if TYPE_CHECKING:
    from ..recipe import Recipe
    from .capture import Scores

logger = logging.getLogger(__name__)

ROBUST = ("worst", "mean")  # how the allocation combines each head's utility over the kinds
VERIFY = ("auto", "held-out", "unseen-kind")  # what each kind's held-out windows are measured under (module text)


def verify_mode(verify: str, several: bool, bounded: bool) -> str:
    """The verification a calibration runs: ``"auto"`` is ``"unseen-kind"`` for a loss bound on several kinds (the
    bound then holds on a kind calibration never read, which is what a user's own text is) and ``"held-out"``
    otherwise; an explicit mode is kept."""
    if verify != "auto":
        return verify
    return "unseen-kind" if several and bounded else "held-out"


SELF_HELD_OUT = "the scored calibration tokens themselves"


def texts_by_kind(input_ids) -> tuple[dict[str, torch.Tensor], bool]:
    """(``{kind: (1, N) ids}``, whether several kinds were given): one tensor is the single unnamed kind ``""``.
    :class:`OptionError` (``input_ids``) for an empty dict, a kind without a name, or kinds of unequal length."""
    if isinstance(input_ids, torch.Tensor):
        return {"": input_ids}, False
    if not isinstance(input_ids, Mapping) or not input_ids:
        raise OptionError("input_ids", "must be a (1, N) tensor of token ids or a non-empty dict {kind: (1, N) tensor}")
    if not all(isinstance(kind, str) and kind for kind in input_ids):
        raise OptionError("input_ids", f"kinds must be named by non-empty strings, not {list(input_ids)}")
    lengths = {kind: int(ids.shape[1]) for kind, ids in input_ids.items()}
    if len(set(lengths.values())) > 1:
        raise OptionError("input_ids", f"every kind's text must be one seq_len long, not {lengths}")
    return dict(input_ids), True


def robust_scores(per_kind: Mapping[str, Scores], robust: str) -> Scores:
    """One kind's scores with the density, kept mass and output error averaged over the kinds and the utility their
    worst (``"worst"``) or mean (``"mean"``); one kind's scores unchanged. Every kind was scored at one length with
    one candidate grid, so their (F, H, C) tensors line up; the KV scores are the first kind's."""
    first = next(iter(per_kind.values()))
    if len(per_kind) == 1:
        return first
    stack = lambda name: torch.stack([getattr(s, name) for s in per_kind.values()])  # noqa: E731  (K, F, H, C)
    utility = stack("utility").amin(0) if robust == "worst" else stack("utility").mean(0)
    mean = {name: stack(name).mean(0) for name in ("density", "mass", "error")}
    return dataclasses.replace(first, utility=utility, **mean)


def windows_per_kind(n_kinds: int) -> int:
    """Verification windows per kind: :data:`VERIFY_WINDOWS` shared out over the kinds, at least one each (five
    kinds: one window each, five in all; the worst of five texts decides, which no one flattering window can)."""
    return max(1, -(-VERIFY_WINDOWS // max(n_kinds, 1)))


class WorstKind(Verifier):
    """Verifies a recipe on every kind's :class:`HeldOut` windows (a :class:`Verifier` each, :func:`windows_per_kind`
    windows); its loss is the worst kind's, and :meth:`loss_detail` gives each kind's measured (``ppl_loss_by_kind``).
    Shares ``verify_lengths``."""

    def __init__(self, model, held: Mapping[str, HeldOut], tokens: int | None = None):
        self.model = model
        per_kind = windows_per_kind(len(held))
        self.kinds = {kind: Verifier(model, h, tokens, windows=per_kind) for kind, h in held.items()}
        self.by_kind: dict[str, float] = {}
        self._last: dict[str, float] = {}  # each kind's latest loss: the likeliest to break a bound goes first

    @property
    def source(self) -> str:
        return "; ".join(f"{kind}: {v.source}" for kind, v in self.kinds.items())

    def loss(self, recipe, length: int, bound: float | None = None) -> tuple[float, float | None, int]:
        """(the worst kind's perplexity rise, the mean prefill sparsity over the kinds measured, tokens scored). With
        ``bound``, the kinds are measured worst-first (by their latest loss) and the rest skipped once one is over it:
        the recipe is over the bound whatever they read (``by_kind`` then names only the kinds measured)."""
        measured = self.worst_first(lambda kind: self.kinds[kind].loss(recipe, length), bound)
        self.by_kind = {kind: measured[kind][0] for kind in self.kinds if kind in measured}
        skipped = [kind for kind in self.kinds if kind not in measured]
        logger.info("at %d tokens: %s%s", length, ", ".join(f"{k} {100 * r:+.2f}%" for k, r in self.by_kind.items()),
                    f" ({', '.join(skipped)} not measured: over the bound already)" if skipped else "")
        sparsities = [m[1] for m in measured.values()]
        sparsity = None if None in sparsities else sum(sparsities) / len(sparsities)
        return max(self.by_kind.values()), sparsity, sum(m[2] for m in measured.values())

    def worst_first(self, measure: Callable[[str], tuple], bound: float | None) -> dict[str, tuple]:
        """``measure(kind)`` (a tuple, the loss first) of each kind, worst first by its latest loss, stopping after the
        first over ``bound`` (None: every kind); by kind, the kinds measured only."""
        measured = {}
        for kind in sorted(self.kinds, key=lambda kind: -self._last.get(kind, 0.0)):
            measured[kind] = measure(kind)
            self._last[kind] = measured[kind][0]
            if bound is not None and measured[kind][0] > bound:
                break
        return measured

    def loss_detail(self) -> dict:
        return {"ppl_loss_by_kind": {kind: round(rise, 6) for kind, rise in self.by_kind.items()}}


def leave_one_out(per_kind: Mapping[str, Scores], robust: str) -> dict[str, Scores]:
    """Per kind, the robust scores of every other kind (:func:`robust_scores`): what calibration would allocate on had it
    never read that kind. Needs two kinds or more."""
    return {kind: robust_scores({k: s for k, s in per_kind.items() if k != kind}, robust) for kind in per_kind}


class UnseenKind:
    """A :class:`WorstKind`'s kinds, each measured on the recipe ``build_without[kind](target)`` (allocated without
    that kind, :func:`leave_one_out`) and, where that is within the bound, on the recipe written (allocated on every
    kind): a kind's loss is the larger. Both are needed: the unseen loss is what another kind of text meets, and the
    recipe written must hold on the kinds it read too; at one target the two differ (block top-k's density follows the
    text, so a recipe allocated without a kind can run denser on it: SmolLM2 at 8K read code +2.89% unseen and +3.62%
    under the recipe written). The loss is the worst kind's, measured worst-first and stopped at the first over the
    bound (:meth:`WorstKind.worst_first`); :meth:`loss_detail` gives each kind's loss and its unseen part."""

    def __init__(self, worst: WorstKind, build_without: Mapping[str, Callable[[float], "Recipe"]]):
        if set(build_without) != set(worst.kinds):
            raise ValueError(f"one recipe builder per kind ({', '.join(worst.kinds)}), not {', '.join(build_without)}")
        self.worst = worst
        self.build_without = dict(build_without)
        self.by_kind: dict[str, float] = {}
        self.unseen_by_kind: dict[str, float] = {}

    @property
    def source(self) -> str:
        return self.worst.source + " (each kind also under a recipe allocated without it)"

    def loss(self, target: float, written: "Recipe", length: int, bound: float | None = None) -> float:
        """The worst kind's loss at ``target``, ``written`` being the recipe allocated on every kind there."""

        def measure(kind: str) -> tuple[float, float]:
            verifier = self.worst.kinds[kind]
            unseen = verifier.loss(self.build_without[kind](target), length)[0]
            if bound is not None and unseen > bound:
                return unseen, unseen
            return max(unseen, verifier.loss(written, length)[0]), unseen

        measured = self.worst.worst_first(measure, bound)
        self.by_kind = {kind: measured[kind][0] for kind in self.worst.kinds if kind in measured}
        self.unseen_by_kind = {kind: measured[kind][1] for kind in self.worst.kinds if kind in measured}
        logger.info("target %.3f at %d tokens, each kind unseen and seen: %s", target, length,
                    ", ".join(f"{k} {100 * r:+.2f}%" for k, r in self.by_kind.items()))
        return max(self.by_kind.values())

    def loss_detail(self) -> dict:
        return {"ppl_loss_by_kind": {kind: round(rise, 6) for kind, rise in self.by_kind.items()},
                "unseen_ppl_loss_by_kind": {kind: round(rise, 6) for kind, rise in self.unseen_by_kind.items()},
                "unseen": True}


def verifier_for(model, texts: Mapping[str, torch.Tensor], several: bool, held_out) -> Verifier:
    """The verifier of a loss-bound calibration: one text's own (``held_out`` a :class:`HeldOut`), or, for several
    kinds, a :class:`WorstKind` over ``held_out`` ``{kind: HeldOut}`` with the kinds of ``texts``. Without
    ``held_out``, each text is verified on its own scored tokens."""
    if held_out is None:
        held_out = {kind: HeldOut(ids, ids[:, :0], SELF_HELD_OUT) for kind, ids in texts.items()}
    elif not several and isinstance(held_out, HeldOut):
        return Verifier(model, held_out)
    if not isinstance(held_out, Mapping) or set(held_out) != set(texts):
        raise OptionError("held_out", f"must be one HeldOut per kind of text given ({', '.join(texts) or 'one text'}): "
                                      "a HeldOut for one text, a dict {kind: HeldOut} for a dict of texts")
    return WorstKind(model, held_out) if several else Verifier(model, held_out[""])


def first_held_out(verifier: Verifier) -> HeldOut:
    """The held-out text of a verifier's first kind (the KV plans are scored, and verified, on the first kind)."""
    return next(iter(verifier.kinds.values())).held if isinstance(verifier, WorstKind) else verifier.held


def kind_stats(texts: Mapping[str, torch.Tensor], per_kind: Mapping[str, Scores], choice: torch.Tensor, quality: dict,
               names: Mapping[str, str]) -> dict:
    """The recipe's ``kinds`` record: per kind, its text, the tokens scored, the chosen allocation's sparsity under that
    kind's densities and, where it was measured (a loss bound, or a fixed target with held-out text), the written
    recipe's loss on its held-out text at the calibration length (0 for a dense recipe)."""
    verified = quality.get("verified")
    losses = verified[0].get("ppl_loss_by_kind", {}) if verified else quality.get("measured", {}).get("ppl_loss_by_kind", {})
    record = {}
    for kind, ids in texts.items():
        entry = {"text": names.get(kind, kind), "scored_tokens": int(ids.shape[1]),
                 "achieved_sparsity": round(per_kind[kind].sparsity(choice), 6)}
        if "max_loss" in quality or "measured" in quality:
            # nothing measured: a dense recipe, no loss; a kind left out of a measurement: None (another was over)
            entry["ppl_loss"] = losses.get(kind) if verified or "measured" in quality else 0.0
        record[kind] = entry
    return record
