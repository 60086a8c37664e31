"""Calibration end to end: the scoring pass over real text (:mod:`.capture`), the allocation to a target or the search
for the sparsest recipe within a loss bound, the calibration record and the KV plans; a recipe comes out."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Mapping, Sequence

import torch

from ..errors import OptionError
from ..hf import num_layers
from ..models import context_length
from ..patch import check_supported
from ..recipe import HeadPlan, Recipe, model_identity
from .answers import AnswerCheck
from .capture import Scores, kv_candidates_for, score_text
from .kinds import (UnseenKind, first_held_out, kind_stats, leave_one_out, robust_scores, texts_by_kind, verifier_for,
                    verify_mode)
from .kv import allocate_kv
from .kv_search import DecodeVerifier, search_kv_budget
from .layer_strategies import check_layers, parse_rules
from .options import DEFAULT_STRATEGIES, CalibrationOptions
from .probe import Probe, layer_sensitivity, layer_weights
from .record import calibration_stats, head_plans
from .retrieval import needle_scores
from .scoring import LayerScores
from .search import LossBound, SearchStep, search_target
from .verify import HeldOut, Verifier, lengths_to_verify, split_text

logger = logging.getLogger(__name__)

# Share of the scoring given to rows that copy a passage from far back (see :func:`.capture.retrieval_rows`); the rest
# goes to rows sampled over the whole text.
RETRIEVAL_WEIGHT = 0.0


def tokens_from_text(tokenizer, text: str, seq_len: int, config=None) -> torch.Tensor:
    """The first ``seq_len`` tokens of ``text`` (a BOS first where the tokenizer adds one)."""
    return split_text(tokenizer, text, seq_len, context_length(config) if config is not None else None)[0]


@torch.no_grad()
def calibrate(
    model,
    input_ids: torch.Tensor | Mapping[str, torch.Tensor],
    target_sparsity: float | None = None,
    block_size: int = 64,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    n_rows: int = 256,
    seed: int = 0,
    text_name: str | Mapping[str, str] = "",
    objective: str = "output",
    on_layer: Callable[[int, LayerScores], None] | None = None,
    kv_budget: float | None = None,
    decode_pages: int = 0,
    decode_recall: float | None = None,
    retrieval_weight: float = RETRIEVAL_WEIGHT,
    dense_prefix_tokens: int = 0,
    probes: Sequence[Probe] = (),
    on_probe: Callable[[int], None] | None = None,
    max_loss: LossBound | str | None = None,
    held_out: HeldOut | Mapping[str, HeldOut] | None = None,
    on_search: Callable[[SearchStep], None] | None = None,
    min_sparse_tokens: int = 0,
    robust: str = "worst",
    verify: str = "auto",
    needles: Sequence[Probe] = (),
    layer_strategies: Sequence[str] = (),
    layer_budgets: str = "kept",
) -> Recipe:
    """Score every candidate budget on every head in one forward pass and allocate to ``target_sparsity`` (default
    0.85), or, with ``max_loss`` (e.g. ``"ppl=2%"``), to the sparsest target whose recipe keeps the perplexity of
    ``held_out`` text (:func:`~patchattn.calibrate.verify.split_text`; default: the scored tokens themselves) within
    the bound (:mod:`patchattn.calibrate.search`). The recipe found is then verified at shorter lengths too, and
    prefills densely below the shortest length from which every longer one was within the bound (its
    ``min_sparse_tokens``, never below the one given); ``on_search`` sees each measured candidate.

    With ``kv_budget`` (fraction of the prompt's KV cache kept, averaged over KV heads) the same pass also scores
    KV plans per KV head (:mod:`patchattn.calibrate.kv`) and allocates them to that budget; ``decode_pages`` > 0
    then makes every kept-in-full or SnapKV head read only that many Quest-selected pages per decode step;
    ``decode_recall`` instead gives each head kept in full the fewest pages whose Quest selection keeps that share
    of the last rows' attention (measured in the same pass).
    Without it the recipe's KV plans follow from its prefill plans (streaming KV heads keep their window).

    Prose alone makes every head look local: a head that retrieves (copies what the prompt asks for from far back)
    rarely shows it on sampled rows, and would be given a window. With ``retrieval_weight`` > 0 the text ends on a
    passage repeated from its middle (:func:`~patchattn.calibrate.kv.with_copy_tail`) and the rows continuing the
    copy, just before the last query block (which every layout keeps dense), weigh that much of each head's score.

    With ``needles`` (:func:`~patchattn.calibrate.probe.needle_probes` with ``depths=``
    :data:`~patchattn.calibrate.retrieval.NEEDLE_DEPTHS`) each is run once and every streaming candidate is also scored
    on the rows that write its answer; its utility is the lower of the two, so a head that reads a needle from far
    back is not given a window that cuts it off (:mod:`patchattn.calibrate.retrieval`; recorded as
    ``calibration["needles"]``).

    With ``probes`` (:func:`~patchattn.calibrate.probe.needle_probes`) a first allocation (at the target, or at
    :data:`PROBE_TARGET` when searching) is probed layer by layer (``on_probe`` called after each) and each layer's
    utility is weighed by what its plan cost the probes: their answers' log-probability and their text's likelihood
    (:mod:`patchattn.calibrate.probe`).

    ``input_ids`` may also be texts of several kinds, ``{kind: (1, N) ids}`` (one N for all; ``held_out`` then
    ``{kind: HeldOut}``, ``text_name`` ``{kind: name}``): each is scored in its own pass and the allocation keeps,
    per head and candidate, the worst utility over the kinds (``robust="worst"``) or their mean (``"mean"``), on the
    density averaged over kinds; with ``max_loss`` a candidate's loss is the worst kind's, each kind verified on its own
    held-out windows (:mod:`patchattn.calibrate.kinds`). The recipe records each kind's scored tokens, sparsity and
    loss (``calibration["kinds"]``). The KV plans (``kv_budget``) are scored on the first kind only;
    ``retrieval_weight`` applies to every kind's pass, and the probes (built from whichever text) weigh the robust
    utility. With ``max_loss`` on several kinds each kind is measured under a recipe allocated without it (``verify``
    ``"auto"`` or ``"unseen-kind"``), so the bound is met on kinds calibration never read
    (:class:`~patchattn.calibrate.kinds.UnseenKind`); ``verify="held-out"`` measures every kind under the recipe
    allocated on all of them. ``layer_strategies`` (``"FIRST-LAST=name,name"`` each) offers those layers only the named
    strategies, each rule's layers within what the allocation without rules gave them (``layer_budgets="kept"``) or
    under one budget over every head (``"shared"``; :mod:`patchattn.calibrate.layer_strategies`)."""
    texts, several = texts_by_kind(input_ids)
    options = CalibrationOptions(
        target_sparsity=target_sparsity, max_loss=max_loss, seq_len=next(iter(texts.values())).shape[1], block_size=block_size,
        strategies=tuple(strategies), objective=objective, n_rows=n_rows, kv_budget=kv_budget, decode_pages=decode_pages,
        decode_recall=decode_recall, retrieval_weight=retrieval_weight, dense_prefix_tokens=dense_prefix_tokens, seed=seed,
        min_sparse_tokens=min_sparse_tokens, robust=robust, verify=verify, layer_strategies=tuple(layer_strategies),
        layer_budgets=layer_budgets,
    )  # every option checked, as the CLI does before loading the model
    mode = verify_mode(options.verify, several, options.max_loss is not None)
    if mode == "unseen-kind" and not several:
        raise OptionError("verify", "unseen-kind verifies each kind of text under a recipe allocated on the others: give "
                                    "two kinds or more (a dict of texts; on the command line --kinds or several --text)")
    check_supported(model)
    check_layers(parse_rules(options.layer_strategies, options.strategies), num_layers(model.config))
    # a loss bound is verified; a fixed target on several kinds with held-out text is measured once per kind (its record)
    measured = options.max_loss is not None or (several and held_out is not None)
    verifier = verifier_for(model, texts, several, held_out) if measured else None
    first_only = dataclasses.replace(options, kv_budget=None, decode_pages=0, decode_recall=None)  # KV: the first kind's
    per_kind = {kind: score_text(model, ids, options if i == 0 else first_only, on_layer) for i, (kind, ids) in enumerate(texts.items())}
    needle = needle_scores(model, needles, next(iter(per_kind.values())), block_size, options.objective, options.dense_prefix_tokens)
    if needle is not None:  # every kind's windowed candidates held to the needles' answer rows too
        per_kind = {kind: needle.apply(s) for kind, s in per_kind.items()}
    scores = robust_scores(per_kind, options.robust)
    build = functools.partial(_build, model.config, scores, options)
    probe_stats, dense_answers, weights = None, None, None
    if probes:
        first = options.target_sparsity if options.max_loss is None else PROBE_TARGET
        probe_stats, dense_answers, weights = _weigh_by_probes(model, scores, build(scores.choose(first)), probes, on_probe)
    unseen = None
    if mode == "unseen-kind" and verifier is not None:
        without = {kind: _weighed(s, weights) for kind, s in leave_one_out(per_kind, options.robust).items()}
        unseen = UnseenKind(verifier, {kind: (lambda t, s=s: _build(model.config, s, options, s.choose(t))) for kind, s in without.items()})
    target, recipe, quality = _allocate(model, scores, build, verifier, options, probes, on_search, dense_answers, unseen)
    recipe.calibration = _record(scores, target, options, text_name, quality, (texts, per_kind) if several else None)
    if probe_stats is not None:
        recipe.calibration["probe"] = probe_stats
    if needle is not None:
        recipe.calibration["needles"] = needle.record(scores.free)
    recipe.kv_layers = _kv_plans(model, scores, options, recipe, verifier) if scores.kv else None
    return recipe


def _allocate(model, scores: Scores, build, verifier: Verifier | None, options: CalibrationOptions,
              probes: Sequence[Probe], on_search, dense_answers: float | None = None,
              unseen: UnseenKind | None = None) -> tuple[float, Recipe, dict]:
    """(target sparsity, its recipe, the search's record): the fixed target, or the sparsest within the loss bound
    (``dense_answers``: the probes' mean dense answer log-probability, when the layer probes measured it; ``unseen``:
    the search's loss measured on each kind unseen)."""
    if options.max_loss is None:
        recipe = build(scores.choose(options.target_sparsity))
        if verifier is None:
            return options.target_sparsity, recipe, {}
        rise, sparsity, tokens = verifier.loss(recipe, options.seq_len)  # every kind, once: what the recipe costs each
        measured = {"length": options.seq_len, "ppl_loss": round(rise, 6), "tokens": tokens,
                    "sparsity": None if sparsity is None else round(sparsity, 6), **verifier.loss_detail()}
        return options.target_sparsity, recipe, {"measured": measured, "verified_on": verifier.source}
    answers = _answer_check(model, probes, options.max_loss, dense_answers)
    return _search(scores, build, verifier, options, on_search, answers, unseen)


def _record(scores: Scores, target: float, options: CalibrationOptions, text_name: str | Mapping[str, str],
            quality: dict, kinds: tuple[dict, dict] | None) -> dict:
    """The recipe's calibration record: the allocation's statistics at ``target``, the search's ``quality`` record, and,
    for texts of several kinds (``kinds``: the texts and their scores by kind), each kind's."""
    choice = scores.choose(target)
    names = text_name if isinstance(text_name, Mapping) else {}
    calibration = calibration_stats(scores, choice, options, "; ".join(names.values()) if names else text_name, target)
    calibration.update(quality)
    if kinds is not None:
        texts, per_kind = kinds
        calibration.update(robust=options.robust, kinds=kind_stats(texts, per_kind, choice, quality, names))
    return calibration


def _build(config, scores: Scores, options: CalibrationOptions, choice: torch.Tensor, min_sparse: int | None = None) -> Recipe:
    """The recipe of one allocation ``choice`` (per free layer, head: a candidate's index into ``scores``' grid); the
    model's windowed layers stay dense (their window applies). ``min_sparse``: its dense threshold (default: the one
    asked for)."""
    chosen = dict(zip(scores.free, head_plans(scores, choice)))
    n_heads = scores.density.shape[1]
    layers = [chosen.get(i) or [HeadPlan("dense") for _ in range(n_heads)] for i in range(scores.n_layers)]
    return Recipe(model=model_identity(config), layers=layers, block_size=options.block_size, name="calibrated",
                  dense_prefix_tokens=options.dense_prefix_tokens,
                  min_sparse_tokens=options.min_sparse_tokens if min_sparse is None else min_sparse)


def _kv_plans(model, scores: Scores, options: CalibrationOptions, recipe: Recipe, verifier: Verifier | None) -> list:
    """The KV plans allocated to ``options.kv_budget`` or, with a loss bound, the smallest budget whose plans keep
    ``recipe`` within it on the first kind's held-out text (the bound covers decoding too); recorded in
    ``recipe.calibration``."""
    def allocate_at(budget: float):
        return allocate_kv(scores.kv, kv_candidates_for(options), scores.n_layers, budget, options.objective,
                           options.decode_pages, options.decode_recall)

    if options.max_loss is None:
        kv_layers, recipe.calibration["kv"] = allocate_at(options.kv_budget)
        return kv_layers
    decoder = DecodeVerifier(model, first_held_out(verifier), options.seq_len)
    kv_layers, recipe.calibration["kv"], recipe.calibration["kv_search"] = search_kv_budget(
        decoder, recipe, allocate_at, options.kv_budget, options.max_loss)
    return kv_layers


# The target a search's probes measure the layers at (the fixed-target default's neighbourhood; SmolLM2 at 8K keeps
# +2.5% perplexity at 80%).
PROBE_TARGET = 0.8


def _weighed(scores: Scores, weights: torch.Tensor | None) -> Scores:
    """``scores`` with each free layer's utility times its probe weight (a copy; the same scores without weights)."""
    if weights is None:
        return scores
    return dataclasses.replace(scores, utility=scores.utility * weights[scores.free][:, None, None].to(scores.utility.dtype))


def _weigh_by_probes(model, scores: Scores, first: Recipe, probes: Sequence[Probe], on_probe) -> tuple[dict, float, torch.Tensor]:
    """Weigh each free layer's utility by what ``first``'s plan for it cost the probes; (the probe statistics, the
    probes' mean dense answer log-probability, the weights per layer)."""
    sens = layer_sensitivity(model, first, probes, on_probe)
    weights = layer_weights(sens.answer_drop, sens.nll_rise)
    scores.utility = _weighed(scores, weights).utility
    return {
        "prompts": len(probes),
        "dense_answer_logprob": round(sens.dense_answer_logprob, 4),
        "dense_nll": round(sens.dense_nll, 5),
        "layer_drop": [round(float(d), 4) for d in sens.answer_drop],
        "layer_nll_rise": [round(float(d), 8) for d in sens.nll_rise],
        "layer_weight": [round(float(w), 4) for w in weights],
    }, sens.dense_answer_logprob, weights


def _answer_check(model, probes: Sequence[Probe], bound: LossBound, dense: float | None = None) -> AnswerCheck | None:
    """The probes' answers as a second measure of each candidate (where probes run); an answer bound without probes is
    refused."""
    if bound.answer is not None and not probes:
        raise OptionError("max_loss", f"{bound} bounds the layer probes' answers, but no probes run; ask for some (probes > 0)")
    return AnswerCheck(model, probes, dense) if probes else None


def _search(scores: Scores, build, verifier: Verifier, options: CalibrationOptions, on_search,
            answers: AnswerCheck | None = None, unseen: UnseenKind | None = None) -> tuple[float, Recipe, dict]:
    """The sparsest target within ``options.max_loss`` on the held-out windows at the calibration length (each kind
    unseen, with ``unseen``; and, with ``answers``, its answer bound on the probes), its recipe verified at shorter
    lengths (dense below the shortest one within the perplexity bound), and the record of both."""
    bound, n_tokens = options.max_loss, options.seq_len
    detail: dict[float, dict] = {}  # target -> what the verifier measured beyond the loss (per kind)

    def measure(target: float) -> tuple[float, float]:
        choice = scores.choose(target)
        recipe = build(choice)
        if unseen is not None:
            loss = unseen.loss(target, recipe, n_tokens, bound.ppl)
            detail[target] = unseen.loss_detail()
        else:
            loss = verifier.loss(recipe, n_tokens, bound.ppl)[0]
            detail[target] = verifier.loss_detail()
        if answers is None or loss > bound.ppl:  # over on perplexity already: the probes cannot save it
            return scores.sparsity(choice), loss
        drop = answers.drop(recipe)
        detail[target]["answer_drop"] = round(drop, 4)
        return scores.sparsity(choice), loss, bound.answer is None or drop <= bound.answer

    target, steps = search_target(measure, bound.ppl, on_step=on_search)
    recipe = build(scores.choose(target))
    record = {"max_loss": bound.to_dict(), "verified_on": (unseen or verifier).source,
              "search": [{**s.to_dict(), **detail[s.target]} for s in steps]}
    if unseen is not None:
        record["verify"] = "unseen-kind"
    if target == 0.0:
        logger.warning("no sparse recipe kept perplexity within %s at %d tokens; the recipe is dense", bound, n_tokens)
        record["verified"] = []
        return target, recipe, record
    lengths = lengths_to_verify(n_tokens, options.min_sparse_tokens, options.block_size)
    rows, valid_from = verifier.verify_lengths(recipe, lengths, bound.ppl)
    recipe.min_sparse_tokens = max(options.min_sparse_tokens, valid_from)
    record["verified"] = rows
    return target, recipe, record


