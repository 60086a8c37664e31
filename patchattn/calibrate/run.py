"""One forward pass over real text: capture each layer's post-RoPE q/k, score, allocate, write a recipe."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .. import options as check
from ..errors import OptionError, PatchattnError
from ..hf import text_config
from ..cache import sliding_windows
from ..layout import num_blocks
from ..models import context_length, prefill
from ..patch import ATTN_NAME, capture, check_supported
from ..recipe import HeadPlan, Recipe, model_identity
from ..strategies import STRATEGIES, Strategy
from .allocate import allocate
from .answers import AnswerCheck
from .kinds import first_held_out, kind_stats, robust_scores, texts_by_kind, verifier_for
from .options import DEFAULT_STRATEGIES, CalibrationOptions
from .probe import Probe, layer_sensitivity, layer_weights
from .kv import EVAL_ROWS, KVScores, allocate_kv, kv_candidates, score_kv_layer, with_copy_tail
from .scoring import LayerScores, sample_rows, score_layer
from .record import calibration_stats, head_plans
from .kv_search import DecodeVerifier, search_kv_budget
from .search import LossBound, SearchStep, search_target
from .verify import HeldOut, Verifier, lengths_to_verify, split_text

logger = logging.getLogger(__name__)

# Share of the scoring given to rows that copy a passage from far back (see ``retrieval_rows``); the rest goes to
# rows sampled over the whole text.
RETRIEVAL_WEIGHT = 0.0


def candidate_grid(strategies: Sequence[str], n_tokens: int, block_size: int) -> list[Strategy]:
    check.all_of("strategies", strategies, sorted(STRATEGIES))  # the words CalibrationOptions uses
    return [cand for name in strategies for cand in STRATEGIES[name].budget_grid(n_tokens, block_size)]


def tokens_from_text(tokenizer, text: str, seq_len: int, config=None) -> torch.Tensor:
    """The first ``seq_len`` tokens of ``text`` (a BOS first where the tokenizer adds one)."""
    return split_text(tokenizer, text, seq_len, context_length(config) if config is not None else None)[0]


def _num_layers(config) -> int:
    config = text_config(config)
    return config.num_hidden_layers


@dataclass
class Scores:
    """What the one scoring pass measured, per free layer (those without the model's own window), head and candidate:
    (F, H, C) tensors; allocating them to any target costs no further forward."""

    free: list[int]
    n_layers: int
    windows: list[int | None]
    candidates: list[Strategy]
    density: torch.Tensor
    mass: torch.Tensor
    error: torch.Tensor
    utility: torch.Tensor  # what the allocation maximises (the objective's, later weighed by the probes)
    sampled_rows: int
    retrieval_rows: int
    kv: dict[int, KVScores]

    def choose(self, target_sparsity: float) -> torch.Tensor:
        n_cand = self.density.shape[-1]
        flat = allocate(self.density.view(-1, n_cand), self.utility.reshape(-1, n_cand), 1.0 - target_sparsity)
        return flat.view(len(self.free), -1)

    def pick(self, values: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        return torch.gather(values, -1, choice[..., None]).squeeze(-1)

    def sparsity(self, choice: torch.Tensor) -> float:
        return 1.0 - float(self.pick(self.density, choice).mean())


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
    utility."""
    texts, several = texts_by_kind(input_ids)
    seq_len = next(iter(texts.values())).shape[1]
    options = CalibrationOptions(
        target_sparsity=target_sparsity, max_loss=max_loss, seq_len=seq_len, block_size=block_size,
        strategies=tuple(strategies), objective=objective, n_rows=n_rows, kv_budget=kv_budget, decode_pages=decode_pages,
        decode_recall=decode_recall, retrieval_weight=retrieval_weight, dense_prefix_tokens=dense_prefix_tokens, seed=seed,
        min_sparse_tokens=min_sparse_tokens, robust=robust,
    )  # every option checked, as the CLI does before loading the model
    check_supported(model)
    verifier = verifier_for(model, texts, several, held_out) if options.max_loss is not None else None
    first_only = dataclasses.replace(options, kv_budget=None, decode_pages=0, decode_recall=None)  # KV: the first kind's
    per_kind = {kind: _score(model, ids, options if i == 0 else first_only, on_layer) for i, (kind, ids) in enumerate(texts.items())}
    scores = robust_scores(per_kind, options.robust)

    def build(choice: torch.Tensor, min_sparse: int = options.min_sparse_tokens) -> Recipe:
        chosen = dict(zip(scores.free, head_plans(scores, choice)))
        n_heads = scores.density.shape[1]
        layers = [chosen.get(i) or [HeadPlan("dense") for _ in range(n_heads)] for i in range(scores.n_layers)]
        return Recipe(model=model_identity(model.config), layers=layers, block_size=block_size, name="calibrated",
                      dense_prefix_tokens=dense_prefix_tokens, min_sparse_tokens=min_sparse)

    probe_stats = None
    if probes:
        first = options.target_sparsity if options.max_loss is None else PROBE_TARGET
        probe_stats = _weigh_by_probes(model, scores, build(scores.choose(first)), probes, on_probe)
    quality = {}
    if options.max_loss is None:
        target = options.target_sparsity
        recipe = build(scores.choose(target))
    else:
        answers = _answer_check(model, probes, options.max_loss)
        target, recipe, quality = _search(scores, build, verifier, options, on_search, answers)
    choice = scores.choose(target)
    names = text_name if isinstance(text_name, Mapping) else {}
    calibration = calibration_stats(scores, choice, options, "; ".join(names.values()) if names else text_name, target)
    calibration.update(quality)
    if several:
        calibration.update(robust=options.robust, kinds=kind_stats(texts, per_kind, choice, quality, names))
    if probe_stats is not None:
        calibration["probe"] = probe_stats
    kv_layers = None
    if scores.kv:
        def allocate_at(budget: float):
            return allocate_kv(scores.kv, _kv_candidates(options), scores.n_layers, budget, objective, decode_pages, decode_recall)

        if options.max_loss is None:
            kv_layers, calibration["kv"] = allocate_at(kv_budget)
        else:  # the bound covers decoding too: the KV plans verified on the first kind's held-out text
            decoder = DecodeVerifier(model, first_held_out(verifier), seq_len)
            kv_layers, calibration["kv"], calibration["kv_search"] = search_kv_budget(decoder, recipe, allocate_at, kv_budget, options.max_loss)
    recipe.calibration, recipe.kv_layers = calibration, kv_layers
    return recipe


# The target a search's probes measure the layers at (the fixed-target default's neighbourhood; SmolLM2 at 8K keeps
# +2.5% perplexity at 80%).
PROBE_TARGET = 0.8


def _kv_candidates(options: CalibrationOptions) -> list:
    return kv_candidates(options.seq_len) if options.kv_budget is not None else []


def _score(model, input_ids: torch.Tensor, options: CalibrationOptions, on_layer) -> Scores:
    """The one forward pass: every candidate scored on every head of the layers without the model's own window."""
    n_tokens, block_size = input_ids.shape[1], options.block_size
    windows = model_windows(model.config, n_tokens)
    free = [i for i, w in enumerate(windows) if w is None]  # the layers the allocation chooses for
    if not free:
        raise PatchattnError(
            f"every layer of this model attends through its own sliding window (at most {max(windows)} tokens) at "
            f"{n_tokens} tokens: there is nothing to make sparse; it already runs on the window's blocks"
        )
    candidates = candidate_grid(options.strategies, n_tokens, block_size)
    rows = sample_rows(n_tokens, options.n_rows, block_size, torch.Generator().manual_seed(options.seed))
    n_sampled, row_weights = int(rows.numel()), None
    kv_cands = _kv_candidates(options)
    copy_rows = retrieval_rows(n_tokens, block_size) if options.retrieval_weight > 0 else None
    if copy_rows is not None:
        w = options.retrieval_weight
        row_weights = torch.cat([torch.full((rows.numel(),), (1.0 - w) / rows.numel()), torch.full((copy_rows.numel(),), w / copy_rows.numel())])
        rows = torch.cat([rows, copy_rows])
    if kv_cands or copy_rows is not None:  # end on a passage repeated from the middle
        input_ids = with_copy_tail(input_ids, torch.Generator().manual_seed(options.seed), eval_rows=EVAL_ROWS + block_size)
    n_layers = _num_layers(model.config)
    layer_scores: dict[int, LayerScores] = {}
    kv_scores: dict[int, KVScores] = {}
    seen: set[int] = set()
    prefix_rows = num_blocks(options.dense_prefix_tokens, block_size)

    def hook(module, query, key, value):
        layer = getattr(module, "layer_idx", len(seen))
        if query.shape[2] != key.shape[2] or layer in seen:
            return
        seen.add(layer)
        scale = getattr(module, "scaling", None) or 1.0 / math.sqrt(query.shape[-1])
        if windows[layer] is None:  # a layer under the model's own window keeps it: nothing to score
            layer_scores[layer] = score_layer(query, key, value, candidates, block_size, rows, scale, row_weights, _out_proj(module), prefix_rows)
        if kv_cands:
            kv_scores[layer] = score_kv_layer(query, key, value, kv_cands, scale)
        if on_layer is not None:
            on_layer(layer, layer_scores.get(layer))

    original = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)  # dense (no recipe), but through our function
    try:
        with capture(hook):
            prefill(model, input_ids)
    finally:
        model.set_attn_implementation(original)
    if len(seen) != n_layers:
        raise PatchattnError(f"captured {len(seen)} of {n_layers} layers; this model's attention is not fully routed through the registry")
    if options.objective == "residual" and any(layer_scores[i].residual_error is None for i in free):
        raise OptionError("objective", "residual needs a linear output projection (o_proj) of query heads x head dim; use 'output'")
    # (F, H, C) over the free layers: the sparsity target is theirs, a model's own windows are not ours to count
    stack = lambda name: torch.stack([getattr(layer_scores[i], name) for i in free])  # noqa: E731
    density, mass, error = stack("density"), stack("kept_mass"), stack("output_error")
    utility = {"mass": mass, "output": 1.0 - error}.get(options.objective)
    if utility is None:
        utility = 1.0 - stack("residual_error")
    return Scores(free, n_layers, windows, candidates, density, mass, error, utility, n_sampled,
                  0 if copy_rows is None else int(copy_rows.numel()), kv_scores)


def _weigh_by_probes(model, scores: Scores, first: Recipe, probes: Sequence[Probe], on_probe) -> dict:
    """Weigh each free layer's utility by what ``first``'s plan for it cost the probes; the probe statistics."""
    sens = layer_sensitivity(model, first, probes, on_probe)
    weights = layer_weights(sens.answer_drop, sens.nll_rise)
    scores.utility = scores.utility * weights[scores.free][:, None, None].to(scores.utility.dtype)
    return {
        "prompts": len(probes),
        "dense_answer_logprob": round(sens.dense_answer_logprob, 4),
        "dense_nll": round(sens.dense_nll, 5),
        "layer_drop": [round(float(d), 4) for d in sens.answer_drop],
        "layer_nll_rise": [round(float(d), 8) for d in sens.nll_rise],
        "layer_weight": [round(float(w), 4) for w in weights],
    }


def _answer_check(model, probes: Sequence[Probe], bound: LossBound) -> AnswerCheck | None:
    """The probes' answers as a second measure of each candidate (where probes run); an answer bound without probes is
    refused."""
    if bound.answer is not None and not probes:
        raise OptionError("max_loss", f"{bound} bounds the layer probes' answers, but no probes run; ask for some (probes > 0)")
    return AnswerCheck(model, probes) if probes else None


def _search(scores: Scores, build, verifier: Verifier, options: CalibrationOptions, on_search,
            answers: AnswerCheck | None = None) -> tuple[float, Recipe, dict]:
    """The sparsest target within ``options.max_loss`` on the held-out windows at the calibration length (and, with
    ``answers``, its answer bound on the probes), its recipe verified at shorter lengths (dense below the shortest one
    within the perplexity bound), and the record of both."""
    bound, n_tokens = options.max_loss, options.seq_len
    detail: dict[float, dict] = {}  # target -> what the verifier measured beyond the loss (per kind)

    def measure(target: float) -> tuple[float, float]:
        choice = scores.choose(target)
        recipe = build(choice)
        loss = verifier.loss(recipe, n_tokens, bound.ppl)[0]
        detail[target] = verifier.loss_detail()
        if answers is None or loss > bound.ppl:  # over on perplexity already: the probes cannot save it
            return scores.sparsity(choice), loss
        drop = answers.drop(recipe)
        detail[target]["answer_drop"] = round(drop, 4)
        return scores.sparsity(choice), loss, bound.answer is None or drop <= bound.answer

    target, steps = search_target(measure, bound.ppl, on_step=on_search)
    recipe = build(scores.choose(target))
    record = {"max_loss": bound.to_dict(), "verified_on": verifier.source, "search": [{**s.to_dict(), **detail[s.target]} for s in steps]}
    if target == 0.0:
        logger.warning("no sparse recipe kept perplexity within %s at %d tokens; the recipe is dense", bound, n_tokens)
        record["verified"] = []
        return target, recipe, record
    lengths = lengths_to_verify(n_tokens, options.min_sparse_tokens, options.block_size)
    rows, valid_from = verifier.verify_lengths(recipe, lengths, bound.ppl)
    recipe.min_sparse_tokens = max(options.min_sparse_tokens, valid_from)
    record["verified"] = rows
    return target, recipe, record


def model_windows(config, n_tokens: int) -> list[int | None]:
    """Per layer, the sliding window the model itself attends through (None: full attention), where it is shorter
    than ``n_tokens``: such layers keep their window (the kernels compute only the blocks it reaches) and are left
    out of the allocation."""
    return [w if w is not None and w < n_tokens else None for w in sliding_windows(config)]


def _out_proj(module) -> torch.Tensor | None:
    """The attention module's output projection weight (hidden, Hq * D), where it is a plain linear layer."""
    for name in ("o_proj", "out_proj", "dense"):
        layer = getattr(module, name, None)
        if isinstance(layer, torch.nn.Linear):
            return layer.weight
    return None


def retrieval_rows(n_tokens: int, block_size: int) -> torch.Tensor | None:
    """The ``EVAL_ROWS`` positions just before the last query block (rows of the copied passage after
    ``with_copy_tail(..., eval_rows=EVAL_ROWS + block_size)``), or None when the text is too short for a copy."""
    last_block_start = (-(-n_tokens // block_size) - 1) * block_size
    start = last_block_start - EVAL_ROWS
    if start < n_tokens // 2 or n_tokens < 8 * EVAL_ROWS:
        return None
    return torch.arange(start, last_block_start)
