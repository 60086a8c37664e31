"""Layer sensitivity from needle probes: which layers' sparsity costs an answer, or the text's likelihood, that
the per-head prose scores do not show.

The per-head scores come from prose, where most heads look local, and they are summed over heads as if every
layer mattered alike. Retrieval does not work that way: on SmolLM2 at 8K one layer's plan alone (its heads
keeping 94-98% of their attention on prose) cost more of a needle's answer than the other 29 layers' plans
together, and passkey answers went with it. A probe measures that end to end: the calibration text with a needle
sentence at a seeded depth and, at the end, a question about it. For each layer, with that layer alone running its
first-pass plan (every other layer dense), two costs: how much log-probability the answer loses, read as generation
reads it (the prompt prefilled, the answer fed after it through the cache), and how much the mean negative
log-likelihood of the prompt's last tokens rises (what perplexity sees; on SmolLM2 the per-layer rises add up to
the whole plan's within 6%). The allocation then runs again with each layer's utility weighed by
``1 + sqrt(answer drop / mean) + sqrt(NLL rise / mean)`` (DuoAttention and MoA also calibrate on synthetic
retrieval; here it only re-weighs layers. The per-head check that keeps windows off the heads a needle's answer reads
is :mod:`patchattn.calibrate.retrieval`, one forward per needle).

Each probe costs one forward per layer that has a sparse head, plus one dense: seconds on a GPU, minutes per
layer at 8K on a CPU.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from .. import hf
from ..errors import OptionError
from ..recipe import HeadPlan, Recipe

logger = logging.getLogger(__name__)

_THINGS = ("lighthouse", "compass", "glacier", "orchard", "beacon", "cathedral", "harvest", "voyage", "meridian", "summit")


@dataclass(frozen=True)
class Probe:
    prompt: torch.Tensor  # (1, N) token ids: text, needle, text, question
    answer: torch.Tensor  # (1, A) the answer's token ids
    depth: float  # where the needle sits, as a fraction of the prompt


def needle_probes(tokenizer, input_ids: torch.Tensor, count: int, seed: int = 0,
                  depths: tuple[float, float] = (0.1, 0.8)) -> list[Probe]:
    """``count`` prompts as long as ``input_ids`` (the calibration tokens): its text with a seeded needle sentence
    inserted at a depth between ``depths`` (fractions of the text kept: 10% and 80% by default) and its tail replaced
    by a question about the needle."""
    rng = random.Random(f"patchattn-probe-{seed}")
    n = input_ids.shape[1]
    enc = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=input_ids.dtype)  # noqa: E731
    probes = []
    for _ in range(count):
        thing, value = rng.choice(_THINGS), str(rng.randrange(1_000_000, 10_000_000))
        needle = enc(f"\n\nThe secret number of the {thing} is {value}.\n\n")
        question = enc(f"\n\nWhat is the secret number of the {thing}? The secret number of the {thing} is")
        body = n - len(needle) - len(question)
        if body < n // 2:
            raise OptionError("seq_len", f"{n} is too short for layer probes; raise it or ask for 0 probes")
        depth = int(body * rng.uniform(*depths))
        text = input_ids[0, :body].cpu()
        prompt = torch.cat([text[:depth], needle, text[depth:], question])[None]
        probes.append(Probe(prompt, enc(f" {value}")[None], depth / n))
    return probes


# The likelihood part reads at most this many of the prompt's last positions, which bounds the logits kept
# (positions x vocabulary floats) on long prompts and large vocabularies.
NLL_POSITIONS = 4096


@dataclass
class Sensitivity:
    answer_drop: torch.Tensor  # (L,) mean drop of the answer's log-probability, one layer's plan at a time
    nll_rise: torch.Tensor  # (L,) mean rise of the NLL of the prompt's last tokens (nats a token; see probe_scores)
    dense_answer_logprob: float
    dense_nll: float


@torch.no_grad()
def continuation_logits(model, prefill_out, continuation: torch.Tensor) -> torch.Tensor:
    """(A, V) float32 logits predicting each of ``continuation``'s A tokens (1, A): the first from the prefill's last
    position (``prefill_out``, a forward with ``use_cache=True``), the rest from feeding ``continuation[:, :-1]``
    through that forward's cache, as a greedy decode reads them."""
    logits = [prefill_out.logits[0, -1:].float()]
    if continuation.shape[1] > 1:
        cached = {hf.cache_argument(model): hf.output_cache(prefill_out)}
        logits.append(model(continuation[:, :-1], use_cache=True, **cached).logits[0].float())
    return torch.cat([lg.to(logits[0].device) for lg in logits])


@torch.no_grad()
def probe_scores(model, probe: Probe) -> tuple[float, float]:
    """(log-probability of the probe's answer, mean NLL of the prompt's second half). The answer is read
    greedy-decoding style: the prompt prefilled, then the answer's tokens fed through the cache (so the prompt's last
    rows are the ones a sparse prefill keeps dense); the NLL comes from the same prefill, over the second half's last
    :data:`NLL_POSITIONS` tokens at most."""
    device = next(model.parameters()).device
    prompt, answer = probe.prompt.to(device), probe.answer.to(device)
    n = prompt.shape[1]
    scored = min(n - 1 - n // 2, NLL_POSITIONS)
    # An int, not an index tensor: accelerate moves tensor arguments to the first GPU of a model spread over several,
    # where the last hidden states are on another.
    out = model(prompt, use_cache=True, logits_to_keep=scored + 1)
    logits = out.logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], prompt[0, n - scored :].to(logits.device))
    logp = continuation_logits(model, out, answer).log_softmax(-1)
    return float(logp.gather(-1, answer[0][:, None].to(logp.device)).sum()), float(nll)


def layer_sensitivity(
    model, recipe: Recipe, probes: Sequence[Probe], on_layer: Callable[[int], None] | None = None
) -> Sensitivity:
    """Per layer, the probes' mean answer drop and NLL rise when only that layer runs its plan in ``recipe``
    (layers whose heads are all dense: 0)."""
    from ..patch import patched

    dense = [probe_scores(model, p) for p in probes]
    drops, rises = torch.zeros(len(recipe.layers)), torch.zeros(len(recipe.layers))
    for li, heads in enumerate(recipe.layers):
        if any(h.strategy != "dense" for h in heads):
            only = [layer if i == li else [HeadPlan("dense")] * len(layer) for i, layer in enumerate(recipe.layers)]
            with patched(model, replace(recipe, layers=only, kv_layers=None), backend="sparse"):
                sparse = [probe_scores(model, p) for p in probes]
            drops[li] = sum(d[0] - s[0] for d, s in zip(dense, sparse)) / len(probes)
            rises[li] = sum(s[1] - d[1] for d, s in zip(dense, sparse)) / len(probes)
        if on_layer is not None:
            on_layer(li)
    logger.info("layer probe answer drops: %s", [round(float(d), 3) for d in drops])
    logger.info("layer probe NLL rises: %s", [round(float(d), 5) for d in rises])
    return Sensitivity(drops, rises, sum(d[0] for d in dense) / len(dense), sum(d[1] for d in dense) / len(dense))


def _relative(cost: torch.Tensor) -> torch.Tensor:
    """Each layer's cost over the mean cost (negative costs, which are noise, count as 0); zeros when none costs."""
    lost = cost.clamp(min=0.0)
    return lost / lost.mean() if float(lost.mean()) > 0.0 else torch.zeros_like(cost)


def layer_weights(answer_drop: torch.Tensor, nll_rise: torch.Tensor | None = None) -> torch.Tensor:
    """``1 + sqrt(answer drop / mean) + sqrt(NLL rise / mean)`` per layer (the NLL term only when given); all ones
    when no layer loses anything. The square roots temper one dominant layer. On SmolLM2 at 8K and 80% sparsity
    (H100, bfloat16, 100 prompts): without probes perplexity +2.8%, passkey 0.22 vs dense 0.32; the answer term alone
    took the one layer the answer needs (drop 1.0 nats against a mean of 0.04) from 0.37 to 0.75 density, passkey 0.35,
    perplexity +3.7%; with the NLL term too that layer gets 0.59, passkey 0.30, single needle 0.84 vs 0.86,
    perplexity +3.1% (``examples/smollm2-8k-probed``)."""
    weights = 1.0 + _relative(answer_drop).sqrt()
    if nll_rise is not None:
        weights = weights + _relative(nll_rise).sqrt()
    return weights
