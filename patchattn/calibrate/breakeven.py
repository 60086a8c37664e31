"""Where sparsity pays on this device: each layer's prefill break-even, timed during calibration on a GPU.

A sparse prefill costs its layout (estimates, top-k, the finisher: launches whose count does not shrink with the
prompt) plus a kernel over the blocks it keeps; dense attention costs the whole causal square. Short prompts lose (a
1B-shaped model prefilled 4K tokens at 0.47x dense on an H200), long ones win. Where the curves cross depends on the
layer's strategies, its head dimension and the device, so it is measured, not guessed: at two or three prompt lengths
each layer's own queries, keys and values (from a dense forward of the calibration text) are timed through the
recipe's sparse path and through dense SDPA, and the length where the sparse path stops losing is the layer's
``min_sparse_tokens`` (:attr:`Recipe.layer_min_tokens <patchattn.recipe.Recipe.layer_min_tokens>`): shorter prompts
prefill that layer densely. The crossing is found on log length and log ratio: interpolated between two measured
lengths, or extrapolated past the longest from the last two when the sparse path still loses there (the ratio falls
as a power of the length while the layouts' fixed cost is paid off; a ratio that does not fall never crosses). A layer
that wins at every length is sparse from the shortest.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..backends import kernel_backend
from ..checks import MAX_TOKENS
from ..compiled import CompiledRecipe
from ..models import prefill
from ..patch import capture, patched
from ..hf import sliding_windows
from ..prefill import sparse_attention
from ..recipe import Recipe
from ..sliding_window import windowed_dense

logger = logging.getLogger(__name__)

BREAK_EVEN_RUNS = 5  # timed runs per (layer, length, path) after one warm-up; the median counts
MIN_LENGTH = 1024  # shorter prompts are not timed (the layouts' fixed cost dominates: dense there anyway)


@dataclass
class LayerTiming:
    """One layer's prefill attention at each measured length (ms): dense SDPA and the recipe's sparse path."""

    lengths: list[int]
    dense_ms: list[float]
    sparse_ms: list[float]

    def threshold(self) -> int:
        """The shortest prompt from which the sparse path is no slower than dense at every longer measured length."""
        return crossing(self.lengths, self.dense_ms, self.sparse_ms)


def crossing(lengths: Sequence[int], dense_ms: Sequence[float], sparse_ms: Sequence[float]) -> int:
    """See :class:`LayerTiming`. 0 when sparse wins at every measured length; otherwise the crossing of
    ``sparse / dense = 1`` on log length and log ratio: interpolated between the last losing length and the next, or,
    when the sparse path still loses at the longest, extrapolated from the last two lengths (the ratio falls as a
    power of the length while the layouts' fixed cost is paid off); never (:data:`MAX_TOKENS`) when it does not
    fall. Rounded up."""
    ratios = [s / d for s, d in zip(sparse_ms, dense_ms)]
    losing = [i for i, r in enumerate(ratios) if r > 1.0]
    if not losing:
        return 0
    last = losing[-1]
    if last == len(lengths) - 1:
        if last == 0 or ratios[last] >= ratios[last - 1]:
            return MAX_TOKENS
        last -= 1  # extrapolate the line through the last two points
    lo, hi = math.log(lengths[last]), math.log(lengths[last + 1])
    r_lo, r_hi = math.log(ratios[last]), math.log(ratios[last + 1])
    at = lo + (hi - lo) * r_lo / (r_lo - r_hi)
    return int(min(MAX_TOKENS, math.ceil(math.exp(min(at, math.log(MAX_TOKENS))))))


def break_even_lengths(seq_len: int) -> list[int]:
    """The calibration length and its half and quarter (not under :data:`MIN_LENGTH`), shortest first."""
    return sorted({n for n in (seq_len // 4, seq_len // 2, seq_len) if n >= MIN_LENGTH})


def _median_ms(fn: Callable[[], object], runs: int, device: torch.device) -> float:
    """Wall-clock median of ``runs`` synchronised calls after one warm-up: the host's launches count (they are what a
    short prompt loses to)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    fn()
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_layers(model, recipe: Recipe, input_ids: torch.Tensor, lengths: Sequence[int], runs: int = BREAK_EVEN_RUNS,
                timer: Callable[[Callable[[], object], int, torch.device], float] = _median_ms) -> list[LayerTiming]:
    """Per layer, its dense and sparse prefill attention at each of ``lengths`` (the first tokens of ``input_ids``),
    on the model's own queries, keys and values. Layers whose heads are all dense time nothing (they never pay). A
    layer under the model's own sliding window is timed as it runs: its dense path is patchattn's windowed dense
    attention and its layout is clipped to the window (timing full causal attention there would credit sparsity with
    what the window already saves)."""
    compiled = CompiledRecipe(recipe)
    timings = [LayerTiming([], [], []) for _ in recipe.layers]
    backend = kernel_backend("auto")
    windows = sliding_windows(model.config)

    def hook(module, query, key, value):
        li = getattr(module, "layer_idx", 0) or 0
        plan = compiled.layers[li]
        if plan.all_dense or query.shape[2] != key.shape[2]:
            return
        scaling = getattr(module, "scaling", None)
        window = windows[li] if windows[li] and query.shape[2] > windows[li] else 0
        if window:  # the model's own sliding window: both paths compute only the blocks it reaches
            dense = lambda: windowed_dense(module, query, key, value, scaling, 0.0, window, li, recipe.block_size,  # noqa: E731
                                           backend, {})
        else:
            dense = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        sparse = lambda: sparse_attention(plan, query, key, value, recipe.block_size, scaling, backend,  # noqa: E731
                                          layer_idx=li, window=window)
        t = timings[li]
        t.lengths.append(query.shape[2])
        t.dense_ms.append(timer(dense, runs, query.device))
        t.sparse_ms.append(timer(sparse, runs, query.device))

    with torch.no_grad(), patched(model, Recipe.uniform(model.config, "dense", block_size=recipe.block_size)), \
            capture(hook):
        for n in lengths:
            prefill(model, input_ids[:, :n])
    return timings


def fit_break_even(model, recipe: Recipe, input_ids: torch.Tensor, lengths: Sequence[int] | None = None,
                   **kwargs) -> dict:
    """Time every layer (:func:`time_layers`) and set ``recipe.layer_min_tokens``; returns the record calibration
    keeps (lengths, per layer: threshold and the sparse/dense ratio at each length)."""
    lengths = list(lengths or break_even_lengths(input_ids.shape[1]))
    timings = time_layers(model, recipe, input_ids, lengths, **kwargs)
    thresholds = [t.threshold() if t.lengths else 0 for t in timings]
    recipe.layer_min_tokens = thresholds if any(thresholds) else None
    record = {
        "lengths": lengths,
        "device": torch.cuda.get_device_name(input_ids.device) if input_ids.is_cuda else str(input_ids.device),
        "layers": [
            {"min_sparse_tokens": th, "ratio": [round(s / d, 3) for s, d in zip(t.sparse_ms, t.dense_ms)]} if t.lengths else None
            for th, t in zip(thresholds, timings)
        ],
    }
    dense_at = {n: sum(1 for th in thresholds if th > n) for n in lengths}
    logger.info("prefill break-even on %s: layers prefilling densely at %s", record["device"],
                ", ".join(f"{n} tokens: {k}" for n, k in dense_at.items()))
    return record
