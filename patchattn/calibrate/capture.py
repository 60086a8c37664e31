"""The scoring pass: one forward over a text through patchattn's attention function (dense), capturing each layer's
post-RoPE q/k/v, scoring every candidate budget on every head (:mod:`.scoring`) and, with a KV budget, every KV plan
on every KV head (:mod:`.kv`). Allocating the :class:`Scores` to any target then costs no further forward."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import options as check
from ..errors import OptionError, PatchattnError
from ..hf import num_layers, sliding_windows
from ..layout import num_blocks
from ..models import prefill
from ..patch import ATTN_NAME, capture
from ..strategies import STRATEGIES, Strategy
from .kv import EVAL_ROWS, KVScores, kv_candidates, score_kv_layer, with_copy_tail
from .layer_strategies import LayerRule, choose, parse_rules
from .options import CalibrationOptions
from .scoring import LayerScores, sample_rows, score_layer


def candidate_grid(strategies: Sequence[str], n_tokens: int, block_size: int) -> list[Strategy]:
    check.all_of("strategies", strategies, sorted(STRATEGIES))  # the words CalibrationOptions uses
    return [cand for name in strategies for cand in STRATEGIES[name].budget_grid(n_tokens, block_size)]


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
    rules: tuple[LayerRule, ...] = ()  # --layer-strategies, applied when allocating (patchattn.calibrate.layer_strategies)
    layer_budgets: str = "kept"

    def choose(self, target_sparsity: float) -> torch.Tensor:
        names = [c.name for c in self.candidates] if self.rules else []
        return choose(self.density, self.utility, self.free, names, self.rules, 1.0 - target_sparsity, self.layer_budgets)

    def pick(self, values: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        return torch.gather(values, -1, choice[..., None]).squeeze(-1)

    def sparsity(self, choice: torch.Tensor) -> float:
        return 1.0 - float(self.pick(self.density, choice).mean())


def model_windows(config, n_tokens: int) -> list[int | None]:
    """Per layer, the sliding window the model itself attends through (None: full attention), where it is shorter
    than ``n_tokens``: such layers keep their window (the kernels compute only the blocks it reaches) and are left
    out of the allocation."""
    return [w if w is not None and w < n_tokens else None for w in sliding_windows(config)]


def retrieval_rows(n_tokens: int, block_size: int) -> torch.Tensor | None:
    """The ``EVAL_ROWS`` positions just before the last query block (rows of the copied passage after
    ``with_copy_tail(..., eval_rows=EVAL_ROWS + block_size)``), or None when the text is too short for a copy."""
    last_block_start = (-(-n_tokens // block_size) - 1) * block_size
    start = last_block_start - EVAL_ROWS
    if start < n_tokens // 2 or n_tokens < 8 * EVAL_ROWS:
        return None
    return torch.arange(start, last_block_start)


def kv_candidates_for(options: CalibrationOptions) -> list:
    """The KV plans scored in the pass: none without a KV budget."""
    return kv_candidates(options.seq_len) if options.kv_budget is not None else []


def score_text(model, input_ids: torch.Tensor, options: CalibrationOptions, on_layer) -> Scores:
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
    kv_cands = kv_candidates_for(options)
    copy_rows = retrieval_rows(n_tokens, block_size) if options.retrieval_weight > 0 else None
    if copy_rows is not None:
        w = options.retrieval_weight
        row_weights = torch.cat([torch.full((rows.numel(),), (1.0 - w) / rows.numel()), torch.full((copy_rows.numel(),), w / copy_rows.numel())])
        rows = torch.cat([rows, copy_rows])
    if kv_cands or copy_rows is not None:  # end on a passage repeated from the middle
        input_ids = with_copy_tail(input_ids, torch.Generator().manual_seed(options.seed), eval_rows=EVAL_ROWS + block_size)
    n_layers = num_layers(model.config)
    layer_scores: dict[int, LayerScores] = {}
    kv_scores: dict[int, KVScores] = {}
    seen: set[int] = set()
    prefix_rows = num_blocks(options.dense_prefix_tokens, block_size)

    def hook(module, query, key, value):
        layer = getattr(module, "layer_idx", len(seen))
        if query.shape[2] != key.shape[2] or layer in seen:
            return
        seen.add(layer)
        scale = attention_scale(module, query)
        if windows[layer] is None:  # a layer under the model's own window keeps it: nothing to score
            layer_scores[layer] = score_layer(query, key, value, candidates, block_size, rows, scale, row_weights, _out_proj(module), prefix_rows)
        if kv_cands:
            kv_scores[layer] = score_kv_layer(query, key, value, kv_cands, scale)
        if on_layer is not None:
            on_layer(layer, layer_scores.get(layer))

    captured_prefill(model, input_ids, hook)
    if len(seen) != n_layers:
        raise PatchattnError(f"captured {len(seen)} of {n_layers} layers; this model's attention is not fully routed through the registry")
    if options.objective == "residual" and any(layer_scores[i].residual_error is None for i in free):
        raise OptionError("objective", "residual needs a linear output projection (o_proj) of query heads x head dim; use 'output'")
    # (F, H, C) over the free layers: the sparsity target is theirs, a model's own windows are not ours to count
    stack = lambda name: torch.stack([getattr(layer_scores[i], name) for i in free])  # noqa: E731
    density, mass, error = stack("density"), stack("kept_mass"), stack("output_error")
    utility = torch.stack([layer_scores[i].utility(options.objective) for i in free])
    return Scores(free, n_layers, windows, candidates, density, mass, error, utility, n_sampled,
                  0 if copy_rows is None else int(copy_rows.numel()), kv_scores,
                  parse_rules(options.layer_strategies, options.strategies), options.layer_budgets)


def captured_prefill(model, input_ids: torch.Tensor, hook) -> None:
    """One dense forward of ``input_ids`` through patchattn's attention function (no recipe), ``hook(module, query,
    key, value)`` called on every attention call; the model's attention implementation restored after."""
    original = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        with capture(hook):
            prefill(model, input_ids)
    finally:
        model.set_attn_implementation(original)


def attention_scale(module, query: torch.Tensor) -> float:
    """The attention module's softmax scale (1 / sqrt(head dim) where it names none)."""
    return getattr(module, "scaling", None) or 1.0 / math.sqrt(query.shape[-1])


def _out_proj(module) -> torch.Tensor | None:
    """The attention module's output projection weight (hidden, Hq * D), where it is a plain linear layer."""
    for name in ("o_proj", "out_proj", "dense"):
        layer = getattr(module, name, None)
        if isinstance(layer, torch.nn.Linear):
            return layer.weight
    return None
