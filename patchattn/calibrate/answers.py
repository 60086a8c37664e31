"""The layer probes' answers as a second measure of a candidate recipe, beside perplexity.

Perplexity on held-out text says little about retrieval: a recipe can keep the text's likelihood and still lose the
number a needle hid (SmolLM2 at 8K, 80%: +2.8% perplexity, passkey 0.22 against dense 0.32). Where calibration runs
layer probes (:mod:`patchattn.calibrate.probe`: the calibration text with a needle and a question), each candidate of
the loss-bound search is also run on them whole, and the mean log-probability its answers lose against dense is
recorded (``answer_drop``, nats); with ``--max-loss ppl=X%,answer=Y`` a candidate must keep that drop within Y too.
One prefill and one short continuation per probe and candidate; the dense answers are scored once.
"""

from __future__ import annotations

from typing import Sequence

from ..patch import patched
from ..recipe import Recipe
from .probe import Probe, probe_scores


class AnswerCheck:
    """The probes' mean answer log-probability drop (nats, dense minus patched) of a recipe, measured once per plan.
    ``dense``: the probes' mean dense answer log-probability where it was measured already (the layer probes measure
    it), else it is measured on first use."""

    def __init__(self, model, probes: Sequence[Probe], dense: float | None = None):
        self.model, self.probes, self._dense = model, list(probes), dense
        self._measured: dict[str, float] = {}

    def _mean_answer_logprob(self) -> float:
        return sum(probe_scores(self.model, p)[0] for p in self.probes) / len(self.probes)

    def drop(self, recipe: Recipe) -> float:
        key = recipe.plan_hash()
        if key not in self._measured:
            if self._dense is None:
                self._dense = self._mean_answer_logprob()
            with patched(self.model, recipe, backend="sparse"):
                self._measured[key] = self._dense - self._mean_answer_logprob()
        return self._measured[key]
