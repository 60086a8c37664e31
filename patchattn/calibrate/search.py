"""Calibrate to a quality bound instead of a sparsity number.

Users know what loss they accept, not what sparsity their model tolerates (SmolLM2-135M keeps +2.5% perplexity at
80% of blocks skipped at 8K, and loses +10% at 85% at 2K). The scoring pass is done once; the allocation to any
target costs nothing, so the search bisects the allocation's target, and each candidate recipe is *verified* with
patched forwards on held-out windows of the calibration text against the dense model on the same windows. The
sparsest verified recipe within the bound is written; the lengths it was verified at, and the loss at each, go into
the recipe (:mod:`patchattn.calibrate.verify`), so the patched model prefills densely below the shortest one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable

from ..errors import OptionError

logger = logging.getLogger(__name__)

# Bisection over the allocation's target sparsity: from this ceiling down, to this resolution, in at most this many
# verified candidates (each one patched forward over the verification windows).
SEARCH_HIGH = 0.95
SEARCH_TOLERANCE = 0.025
SEARCH_MAX_STEPS = 7


@dataclass(frozen=True)
class LossBound:
    """The most quality a recipe may lose against the dense model: ``ppl`` is the relative rise of perplexity on
    held-out text (0.02: +2%); ``answer`` (optional, nats) the most log-probability the layer probes' answers may lose
    on average (:mod:`patchattn.calibrate.answers`; only where probes run)."""

    ppl: float
    answer: float | None = None

    @classmethod
    def parse(cls, text: str) -> "LossBound":
        """``"ppl=2%"``, ``"ppl=0.02"`` (a fraction) or just ``"2%"``, optionally with ``",answer=0.5"`` (nats);
        :class:`OptionError` (``max_loss``) otherwise."""
        if isinstance(text, LossBound):
            return text
        parts = str(text).replace(" ", "").split(",")
        ppl = _parse_ppl(parts[0], text)
        answer = None
        for part in parts[1:]:
            match = re.fullmatch(r"answer=([0-9]*\.?[0-9]+)", part)
            if match is None or answer is not None:
                raise OptionError("max_loss", f"must read like ppl=2% or ppl=2%,answer=0.5 (nats the probes' answers may lose), not {text!r}")
            answer = float(match.group(1))
            if answer <= 0.0:
                raise OptionError("max_loss", f"answer must be a loss above 0 nats, not {text!r}")
        return cls(ppl=ppl, answer=answer)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, **({} if self.answer is None else {"answer": self.answer})}

    def __str__(self) -> str:
        ppl = f"ppl={self.ppl:.4g}" if self.ppl < 0.001 else f"ppl={100 * self.ppl:.3g}%"
        return ppl if self.answer is None else f"{ppl},answer={self.answer:g}"


def _parse_ppl(spec: str, text) -> float:
    match = re.fullmatch(r"(?:ppl=)?([0-9]*\.?[0-9]+)(%?)", spec)
    if match is None:
        raise OptionError("max_loss", f"must read like ppl=2% (the perplexity rise a recipe may cost), not {text!r}")
    value = float(match.group(1)) / (100.0 if match.group(2) else 1.0)
    if not 0.0 < value < 1.0:
        raise OptionError("max_loss", f"must be a perplexity rise above 0% and below 100%, not {text!r}")
    return value


# The bound `patchattn calibrate` keeps when given neither --target-sparsity nor --max-loss.
DEFAULT_MAX_LOSS = LossBound(ppl=0.02)


@dataclass(frozen=True)
class SearchStep:
    target: float  # the allocation's target sparsity
    sparsity: float  # what the allocation achieved (calibration's measure)
    loss: float  # the measured relative perplexity rise
    within: bool

    def to_dict(self) -> dict:
        return {"target": round(self.target, 6), "sparsity": round(self.sparsity, 6), "ppl_loss": round(self.loss, 6),
                "within": self.within}


def search_target(
    measure: Callable[[float], tuple[float, float]],
    bound: float,
    high: float = SEARCH_HIGH,
    tolerance: float = SEARCH_TOLERANCE,
    max_steps: int = SEARCH_MAX_STEPS,
    on_step: Callable[[SearchStep], None] | None = None,
    high_first: bool = False,
) -> tuple[float, list[SearchStep]]:
    """The largest target sparsity whose measured loss is within ``bound``, by bisection on [0, ``high``]: the midpoint
    first (a sparsity ceiling is almost never within a useful bound, and a measurement costs forwards), or with
    ``high_first`` the ceiling first (a KV budget the user asked for usually is).

    ``measure(target)`` returns (achieved sparsity, loss), or (achieved sparsity, loss, whether the other bounds held)
    when there are others (the probes' answers). Target 0 is the dense model (no loss) and is never measured.
    Only measured targets are returned: the result is 0.0 (dense) when no measured target stayed within the bound.
    Assumes the loss grows with the target (it does, up to measurement noise: a higher target keeps less of every
    head's scored attention); every target returned was measured within the bound, whatever the noise. Stops after ``max_steps`` measurements or when the bracket is narrower than
    ``tolerance``."""
    steps: list[SearchStep] = []

    def within(target: float) -> bool:
        sparsity, loss, *held = measure(target)
        step = SearchStep(target, sparsity, loss, loss <= bound and all(held))
        steps.append(step)
        logger.info("target sparsity %.3f: achieved %.3f, perplexity %+.2f%%", target, sparsity, 100 * loss)
        if on_step is not None:
            on_step(step)
        return step.within

    if high_first and max_steps > 0 and within(high):
        return high, steps
    low = 0.0
    while high - low > tolerance and len(steps) < max_steps:
        mid = (low + high) / 2
        if within(mid):
            low = mid
        else:
            high = mid
    return low, steps
