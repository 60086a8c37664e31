"""One forward pass over real text: capture each layer's post-RoPE q/k, score, allocate, write a recipe."""

from __future__ import annotations

import datetime
import logging
import math
from typing import Callable, Sequence

import torch

from .. import __version__
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
from .options import DEFAULT_STRATEGIES, CalibrationOptions
from .probe import Probe, layer_sensitivity, layer_weights
from .kv import EVAL_ROWS, KVScores, kv_candidates, pages_for_recall, score_kv_layer, with_copy_tail
from .scoring import LayerScores, sample_rows, score_layer

logger = logging.getLogger(__name__)

# Share of the scoring given to rows that copy a passage from far back (see ``retrieval_rows``); the rest goes to
# rows sampled over the whole text.
RETRIEVAL_WEIGHT = 0.0


def candidate_grid(strategies: Sequence[str], n_tokens: int, block_size: int) -> list[Strategy]:
    check.all_of("strategies", strategies, sorted(STRATEGIES))  # the words CalibrationOptions uses
    return [cand for name in strategies for cand in STRATEGIES[name].budget_grid(n_tokens, block_size)]


def tokens_from_text(tokenizer, text: str, seq_len: int, config=None) -> torch.Tensor:
    limit = context_length(config) if config is not None else None
    if limit is not None and seq_len > limit:
        raise OptionError("seq_len", f"{seq_len} exceeds the model's context of {limit} tokens; use a length <= {limit}")
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt").input_ids[:, :seq_len]
    if ids.shape[1] < seq_len:
        raise OptionError("seq_len", f"{seq_len} is more than the calibration text's {ids.shape[1]} tokens; give a longer text or a shorter seq_len")
    return ids


def _num_layers(config) -> int:
    config = text_config(config)
    return config.num_hidden_layers


@torch.no_grad()
def calibrate(
    model,
    input_ids: torch.Tensor,
    target_sparsity: float = 0.85,
    block_size: int = 64,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    n_rows: int = 256,
    seed: int = 0,
    text_name: str = "",
    objective: str = "output",
    on_layer: Callable[[int, LayerScores], None] | None = None,
    kv_budget: float | None = None,
    decode_pages: int = 0,
    decode_recall: float | None = None,
    retrieval_weight: float = RETRIEVAL_WEIGHT,
    dense_prefix_tokens: int = 0,
    probes: Sequence[Probe] = (),
    on_probe: Callable[[int], None] | None = None,
) -> Recipe:
    """Score every candidate budget on every head in one forward pass and allocate to ``target_sparsity``.

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

    With ``probes`` (:func:`~patchattn.calibrate.probe.needle_probes`) the first allocation is probed layer by layer
    (``on_probe`` called after each) and allocated again with each layer's utility weighed by what its plan cost
    the probes: their answers' log-probability and their text's likelihood (:mod:`patchattn.calibrate.probe`)."""
    CalibrationOptions(
        target_sparsity=target_sparsity, seq_len=input_ids.shape[1], block_size=block_size, strategies=tuple(strategies),
        objective=objective, n_rows=n_rows, kv_budget=kv_budget, decode_pages=decode_pages, decode_recall=decode_recall,
        retrieval_weight=retrieval_weight, dense_prefix_tokens=dense_prefix_tokens, seed=seed,
    )  # every option checked, as the CLI does before loading the model
    check_supported(model)
    n_tokens = input_ids.shape[1]
    windows = model_windows(model.config, n_tokens)
    free = [i for i, w in enumerate(windows) if w is None]  # the layers the allocation chooses for
    if not free:
        raise PatchattnError(
            f"every layer of this model attends through its own sliding window (at most {max(windows)} tokens) at "
            f"{n_tokens} tokens: there is nothing to make sparse; it already runs on the window's blocks"
        )
    candidates = candidate_grid(strategies, n_tokens, block_size)
    rows = sample_rows(n_tokens, n_rows, block_size, torch.Generator().manual_seed(seed))
    row_weights = None
    n_layers = _num_layers(model.config)
    scores: dict[int, LayerScores] = {}
    seen: set[int] = set()
    kv_scores: dict[int, KVScores] = {}
    kv_cands = kv_candidates(n_tokens) if kv_budget is not None else []
    copy_rows = retrieval_rows(n_tokens, block_size) if retrieval_weight > 0 else None
    if copy_rows is not None:
        row_weights = torch.cat([
            torch.full((rows.numel(),), (1.0 - retrieval_weight) / rows.numel()),
            torch.full((copy_rows.numel(),), retrieval_weight / copy_rows.numel()),
        ])
        rows = torch.cat([rows, copy_rows])
    if kv_budget is not None or copy_rows is not None:  # end on a passage repeated from the middle
        input_ids = with_copy_tail(input_ids, torch.Generator().manual_seed(seed), eval_rows=EVAL_ROWS + block_size)

    def hook(module, query, key, value):
        layer = getattr(module, "layer_idx", len(seen))
        if query.shape[2] != key.shape[2] or layer in seen:
            return
        seen.add(layer)
        scale = getattr(module, "scaling", None) or 1.0 / math.sqrt(query.shape[-1])
        if windows[layer] is None:  # a layer under the model's own window keeps it: nothing to score
            scores[layer] = score_layer(
                query, key, value, candidates, block_size, rows, scale, row_weights, _out_proj(module), num_blocks(dense_prefix_tokens, block_size)
            )
        if kv_cands:
            kv_scores[layer] = score_kv_layer(query, key, value, kv_cands, scale)
        if on_layer is not None:
            on_layer(layer, scores.get(layer))

    original = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)  # dense (no recipe), but through our function
    try:
        with capture(hook):
            prefill(model, input_ids)
    finally:
        model.set_attn_implementation(original)
    if len(seen) != n_layers:
        raise PatchattnError(f"captured {len(seen)} of {n_layers} layers; this model's attention is not fully routed through the registry")

    if objective == "residual" and any(scores[i].residual_error is None for i in free):
        raise OptionError("objective", "residual needs a linear output projection (o_proj) of query heads x head dim; use 'output'")
    # (F, H, C) over the free layers: the sparsity target is theirs, a model's own windows are not ours to count
    density = torch.stack([scores[i].density for i in free])
    mass = torch.stack([scores[i].kept_mass for i in free])
    error = torch.stack([scores[i].output_error for i in free])
    n_heads, n_cand = density.shape[1], density.shape[2]
    if objective == "mass":
        utility = mass
    elif objective == "output":
        utility = 1.0 - error
    else:
        utility = 1.0 - torch.stack([scores[i].residual_error for i in free])

    def choose(utility: torch.Tensor) -> torch.Tensor:
        return allocate(density.view(-1, n_cand), utility.reshape(-1, n_cand), 1.0 - target_sparsity).view(len(free), n_heads)

    def build(choice: torch.Tensor) -> Recipe:
        chosen = dict(zip(free, _head_plans(candidates, choice, density, mass, error)))
        layers = [chosen.get(i) or [HeadPlan("dense") for _ in range(n_heads)] for i in range(n_layers)]
        return Recipe(
            model=model_identity(model.config), layers=layers, block_size=block_size, name="calibrated",
            dense_prefix_tokens=dense_prefix_tokens,
        )

    choice = choose(utility)
    probe_stats = None
    if probes:
        sens = layer_sensitivity(model, build(choice), probes, on_probe)
        weights = layer_weights(sens.answer_drop, sens.nll_rise)
        choice = choose(utility * weights[free][:, None, None].to(utility.dtype))
        probe_stats = {
            "prompts": len(probes),
            "dense_answer_logprob": round(sens.dense_answer_logprob, 4),
            "dense_nll": round(sens.dense_nll, 5),
            "layer_drop": [round(float(d), 4) for d in sens.answer_drop],
            "layer_nll_rise": [round(float(d), 8) for d in sens.nll_rise],
            "layer_weight": [round(float(w), 4) for w in weights],
        }
    recipe = build(choice)
    chosen_density = torch.gather(density, -1, choice[..., None]).squeeze(-1)
    chosen_mass = torch.gather(mass, -1, choice[..., None]).squeeze(-1)
    chosen_error = torch.gather(error, -1, choice[..., None]).squeeze(-1)
    layer_density = dict(zip(free, chosen_density.mean(-1).tolist()))
    calibration = {
        "patchattn_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "text": text_name,
        "seq_len": n_tokens,
        "target_sparsity": target_sparsity,
        "achieved_sparsity": round(1.0 - float(chosen_density.mean()), 6),
        "mean_kept_mass": round(float(chosen_mass.mean()), 6),
        "mean_output_error": round(float(chosen_error.mean()), 6),
        "objective": objective,
        "sampled_rows": int(rows.numel()) - (0 if copy_rows is None else int(copy_rows.numel())),
        "retrieval_rows": 0 if copy_rows is None else int(copy_rows.numel()),
        "retrieval_weight": retrieval_weight if copy_rows is not None else 0.0,
        "strategies": list(strategies),
        "layer_density": [round(float(layer_density[i]), 6) if i in layer_density else None for i in range(n_layers)],
        **({"model_windows": {str(i): w for i, w in enumerate(windows) if w is not None}} if len(free) < n_layers else {}),
        **({"probe": probe_stats} if probe_stats is not None else {}),
        "candidates": [
            {
                "strategy": cand.name,
                "params": cand.params(),
                "mean_density": round(float(density[..., ci].mean()), 6),
                "mean_kept_mass": round(float(mass[..., ci].mean()), 6),
                "mean_output_error": round(float(error[..., ci].mean()), 6),
            }
            for ci, cand in enumerate(candidates)
        ],
    }
    kv_layers = None
    if kv_cands:
        kv_layers, calibration["kv"] = _allocate_kv(kv_scores, kv_cands, n_layers, kv_budget, objective, decode_pages, decode_recall)
    recipe.calibration, recipe.kv_layers = calibration, kv_layers
    return recipe


def model_windows(config, n_tokens: int) -> list[int | None]:
    """Per layer, the sliding window the model itself attends through (None: full attention), where it is shorter
    than ``n_tokens``: such layers keep their window (the kernels compute only the blocks it reaches) and are left
    out of the allocation."""
    return [w if w is not None and w < n_tokens else None for w in sliding_windows(config)]


def _head_plans(candidates: list[Strategy], choice: torch.Tensor, density, mass, error) -> list[list[HeadPlan]]:
    """Each head's chosen candidate as a plan, with its calibration scores."""
    return [
        [
            HeadPlan(candidates[int(c)].name, candidates[int(c)].params(), float(density[li, hi, c]), float(mass[li, hi, c]), float(error[li, hi, c]))
            for hi, c in enumerate(layer_choice)
        ]
        for li, layer_choice in enumerate(choice)
    ]


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


def _allocate_kv(kv_scores: dict, candidates: list, n_layers: int, kv_budget: float, objective: str, decode_pages: int, decode_recall):
    """Choose one KV plan per KV head for ``kv_budget``; returns (plans per layer, calibration stats)."""
    import dataclasses

    cost = torch.stack([kv_scores[i].cost for i in range(n_layers)])  # (L, Hkv, C)
    mass = torch.stack([kv_scores[i].kept_mass for i in range(n_layers)])
    error = torch.stack([kv_scores[i].output_error for i in range(n_layers)])
    n_kv, n_cand = cost.shape[1], cost.shape[2]
    utility = mass if objective == "mass" else 1.0 - error
    choice = allocate(cost.view(-1, n_cand), utility.reshape(-1, n_cand), kv_budget).view(n_layers, n_kv)
    plans = []
    for li in range(n_layers):
        layer = []
        auto_pages = pages_for_recall(kv_scores[li].quest_recall, decode_recall) if decode_recall is not None else None
        for h in range(n_kv):
            plan = candidates[int(choice[li, h])]
            if decode_pages and plan.policy in ("full", "snapkv"):
                plan = dataclasses.replace(plan, decode_pages=decode_pages)
            elif auto_pages is not None and plan.policy == "full":
                plan = dataclasses.replace(plan, decode_pages=auto_pages[h])
            layer.append(plan)
        plans.append(layer)
    pick = lambda t: torch.gather(t, -1, choice[..., None]).squeeze(-1)  # noqa: E731
    policies: dict[str, int] = {}
    for layer in plans:
        for p in layer:
            policies[p.policy] = policies.get(p.policy, 0) + 1
    stats = {
        "budget": kv_budget,
        "achieved": round(float(pick(cost).mean()), 6),
        "mean_kept_mass": round(float(pick(mass).mean()), 6),
        "mean_output_error": round(float(pick(error).mean()), 6),
        "eval_rows": EVAL_ROWS,
        "eval_text": "calibration text ending on a passage repeated from its middle",
        "policies": policies,
        "decode_pages": decode_pages,
        "decode_recall": decode_recall,
        "quest_pages": [p.decode_pages for layer in plans for p in layer if p.policy == "full"],
    }
    return plans, stats


def uniform_baseline(recipe: Recipe, tolerance: float = 0.02) -> Recipe:
    """The same strategy and budget on every head, at (about) the calibrated recipe's sparsity.

    From the calibration's per-candidate averages: among candidates whose mean density is within
    ``tolerance`` of the calibrated recipe's, the one keeping the most mass (else the nearest in density).
    """
    cands = recipe.calibration.get("candidates")
    if not cands:
        raise PatchattnError("this recipe has no calibration statistics; a uniform baseline needs a calibrated recipe")
    target = 1.0 - recipe.calibration["achieved_sparsity"]
    near = [c for c in cands if abs(c["mean_density"] - target) <= tolerance and c["strategy"] != "dense"]
    objective = recipe.calibration.get("objective", "mass")
    score = (lambda c: c["mean_kept_mass"]) if objective == "mass" else (lambda c: -c.get("mean_output_error", 0.0))
    best = max(near, key=score) if near else min(cands, key=lambda c: abs(c["mean_density"] - target))
    windowed = {int(i) for i in recipe.calibration.get("model_windows", {})}  # layers that keep the model's window
    layers = [
        [HeadPlan("dense") if li in windowed else HeadPlan(best["strategy"], dict(best["params"])) for _ in layer]
        for li, layer in enumerate(recipe.layers)
    ]
    calibration = {
        "baseline_of": recipe.name,
        **({"model_windows": recipe.calibration["model_windows"]} if windowed else {}),
        "seq_len": recipe.calibration.get("seq_len"),
        "achieved_sparsity": round(1.0 - best["mean_density"], 6),
        "mean_kept_mass": best["mean_kept_mass"],
        "mean_output_error": best.get("mean_output_error"),
    }
    return Recipe(
        model=dict(recipe.model), layers=layers, block_size=recipe.block_size, calibration=calibration, name="uniform",
        min_sparse_tokens=recipe.min_sparse_tokens, dense_prefix_tokens=recipe.dense_prefix_tokens,
    )
