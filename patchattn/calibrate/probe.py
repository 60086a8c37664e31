"""Layer sensitivity from needle probes: which layers' sparsity costs an answer that prose does not show.

The per-head scores come from prose, where most heads look local, and they are summed over heads as if every
layer mattered alike. Retrieval does not work that way: on SmolLM2 at 8K one layer's plan alone (its heads
keeping 94-98% of their attention on prose) cost more of a needle's answer than the other 29 layers' plans
together, and passkey answers went with it. A probe measures that end to end: the calibration text with a needle
sentence at a seeded depth and, at the end, a question about it; a layer's sensitivity is how much log-probability
the answer loses when that layer alone runs its first-pass plan (every other layer dense), read as generation
reads it (the prompt prefilled, the answer fed after it through the cache). The allocation then runs again with
each layer's utility weighed by ``1 + sqrt(drop / mean drop)`` (DuoAttention and MoA also calibrate on synthetic
retrieval; here it only re-weighs layers, the per-head choice still comes from prose).

Each probe costs one forward per layer that has a sparse head, plus one dense: seconds on a GPU, minutes per
layer at 8K on a CPU.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from ..errors import PatchattnError
from ..recipe import HeadPlan, Recipe

logger = logging.getLogger(__name__)

_THINGS = ("lighthouse", "compass", "glacier", "orchard", "beacon", "cathedral", "harvest", "voyage", "meridian", "summit")


@dataclass(frozen=True)
class Probe:
    prompt: torch.Tensor  # (1, N) token ids: text, needle, text, question
    answer: torch.Tensor  # (1, A) the answer's token ids
    depth: float  # where the needle sits, as a fraction of the prompt


def needle_probes(tokenizer, input_ids: torch.Tensor, count: int, seed: int = 0) -> list[Probe]:
    """``count`` prompts as long as ``input_ids`` (the calibration tokens): its text with a seeded needle sentence
    inserted at a depth between 10% and 80% and its tail replaced by a question about the needle."""
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
            raise PatchattnError(f"--seq-len {n} is too short for layer probes; raise it or pass --probes 0")
        depth = int(body * rng.uniform(0.1, 0.8))
        text = input_ids[0, :body].cpu()
        prompt = torch.cat([text[:depth], needle, text[depth:], question])[None]
        probes.append(Probe(prompt, enc(f" {value}")[None], depth / n))
    return probes


@torch.no_grad()
def answer_logprob(model, probe: Probe) -> float:
    """Log-probability of the probe's answer, greedy-decoding style: the prompt prefilled, then the answer's
    tokens fed through the cache (so the prompt's last rows are the ones a sparse prefill keeps dense)."""
    device = next(model.parameters()).device
    prompt, answer = probe.prompt.to(device), probe.answer.to(device)
    out = model(prompt, use_cache=True, logits_to_keep=1)
    logits = [out.logits[0, -1:]]
    if answer.shape[1] > 1:
        logits.append(model(answer[:, :-1], past_key_values=out.past_key_values, use_cache=True).logits[0])
    logp = torch.cat(logits).float().log_softmax(-1)
    return float(logp.gather(-1, answer[0][:, None]).sum())


def layer_sensitivity(
    model, recipe: Recipe, probes: Sequence[Probe], on_layer: Callable[[int], None] | None = None
) -> tuple[torch.Tensor, float]:
    """Per layer, the mean drop of the probes' answer log-probability when only that layer runs its plan in
    ``recipe`` (layers whose heads are all dense: 0). Returns (drops (L,), the dense mean log-probability)."""
    from ..patch import patched

    dense = [answer_logprob(model, p) for p in probes]
    drops = torch.zeros(len(recipe.layers))
    for li, heads in enumerate(recipe.layers):
        if any(h.strategy != "dense" for h in heads):
            only = [layer if i == li else [HeadPlan("dense")] * len(layer) for i, layer in enumerate(recipe.layers)]
            with patched(model, replace(recipe, layers=only, kv_layers=None)):
                drops[li] = sum(d - answer_logprob(model, p) for d, p in zip(dense, probes)) / len(probes)
        if on_layer is not None:
            on_layer(li)
    logger.info("layer probe drops: %s", [round(float(d), 3) for d in drops])
    return drops, sum(dense) / len(dense)


def layer_weights(drops: torch.Tensor) -> torch.Tensor:
    """``1 + sqrt(drop / mean drop)`` per layer (negative drops, which are noise, count as 0); all ones when no
    layer loses anything. The square root tempers one dominant layer: on SmolLM2 at 8K and 80% sparsity, the probes'
    one layer (drop 1.0 against a mean of 0.04) went from 0.37 to 0.75 density with it (passkey 0.33 vs dense 0.35,
    perplexity +3.7%) and to 0.95 with the linear weight (passkey 0.30, perplexity +4.0%); unweighted: 0.23, +2.8%."""
    lost = drops.clamp(min=0.0)
    if float(lost.mean()) <= 0.0:
        return torch.ones_like(drops)
    return 1.0 + (lost / lost.mean()).sqrt()
