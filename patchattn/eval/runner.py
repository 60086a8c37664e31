"""Run every variant (dense or a recipe) on the same prompts, per length and task; return plain data.

The results dict is versioned and JSON-serialisable::

    {"schema_version": 2, "model": str, "lengths": [int], "tasks": [str], "trials": int, "seed": int,
     "speed_runs": int, "created": ISO-8601 UTC str, "environment": {...}, "variants": {name: {...}}, "complete": bool,
     "ppl_texts": [{"name", "path", "tokens", "skipped_lengths"}],
     "results": [{"length", "task", "variant", "metric", "value", "sparsity", "trials", "scores",
                  "replies", "prompt_tokens", "seconds", "kv_bytes", "kv_cache"}]}

``metric`` is ``"perplexity"`` for ``ppl``, ``"ttft_ms"`` for ``speed`` and ``"accuracy"`` (mean score over
trials) otherwise. A ``speed`` row's ``value`` is the median time to first token over ``speed_runs`` rounds that run
every variant in turn, each a ``generate`` of one token (``scores`` holds each round's; header
``ttft_interleaved`` true: :mod:`patchattn.eval.interleaved`; results without it timed them in the generations below).
It also has ``ms_per_token`` (median) and
``ms_per_token_runs``, ``decode_tokens``, ``peak_bytes`` (median peak memory of one generation),
``peak_memory`` (what that measures: ``"cuda_allocated"``, ``"process_rss"`` on a CPU, or None) and
``device``. ``environment`` has ``device`` and ``device_name`` (the GPU's or CPU's model) and ``threads``.
``kv_bytes`` is the mean size of the KV cache at the end of each generation (None for perplexity), the
patched variants' through the head-budgeted cache. ``kv_cache`` says whether that cache held them: ``"budgeted"``, or
``"full: <why>"`` when a recipe that compresses the KV cache ran on the full one (a short prompt, a right-padded batch, a
cache it did not replace), so its bytes are not the recipe's; None for dense and for recipes that keep every token.
``sparsity`` is the fraction of causal query-key blocks the variant skipped in the prefill attention
of that task at that length (0.0 for dense; None when nothing ran sparse).

``patchattn eval --lm-eval-tasks`` adds lm-eval's rows (lmeval.py: ``task`` is ``"lmeval:" + its lm-eval name``,
``length`` None but for patchattn's own tasks, a ``stderr`` beside the value) and a top-level ``lm_eval`` with lm-eval's
``version``, the ``tasks`` asked for and the ``options`` passed.

A ``ppl`` row's ``scores`` holds each window's perplexity (``ppl_windows`` of them; results written before it had one).

``ppl_texts`` (``eval --ppl-text``; ppl_texts.py) names the user's own texts: ``name`` (the file's stem, made unique),
``path``, ``tokens`` (the whole file's) and ``skipped_lengths`` (lengths longer than the text, where it has no rows). Each
text has a perplexity row per length and variant as ``ppl`` has, with ``task`` ``"ppl:" + name`` and ``text`` its path.
Results written before it have no ``ppl_texts``.

Schema 1 had no ``speed_runs``, ``created``, ``peak_memory``, ``*_runs``, ``decode_tokens`` or ``device_name``,
and a speed row's ``scores`` held the one median.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping, Sequence

import torch

from ..errors import InputTooLongError, OptionError
from ..models import context_length, prefill
from ..patch import patched, quality_backend
from ..recipe import Recipe
from ..stats import record_sparsity
from . import break_even
from .haystack import Prompt, build_prompt
from .options import DEFAULT_TASKS, MIN_LENGTH, TASKS, EvalOptions  # noqa: F401  (TASKS: the task names, public here too)
from .ppl_texts import PplText, load_ppl_texts
from .interleaved import interleaved_ttft
from .tasks import SpeedResult, answer, measure_speed, perplexity, ppl_input_ids, speed_generate_kwargs, window_seed

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
SPEED_DECODE_TOKENS = 16
Progress = Callable[[int, str], None]


def check_lengths(model, lengths: Sequence[int]) -> None:
    """Raise InputTooLongError for a length beyond the model's context (call before any expensive work)."""
    limit = context_length(model.config)
    for length in lengths:
        if length < MIN_LENGTH:
            raise OptionError("lengths", f"{length} tokens is too short; use at least {MIN_LENGTH} tokens")
        if limit is not None and length > limit:
            raise InputTooLongError(
                f"eval length {length} tokens exceeds the model's context of {limit} tokens; "
                f"choose lengths up to {limit}"
            )


def eval_steps(variants: Mapping, lengths: Sequence[int], tasks: Sequence[str] = DEFAULT_TASKS, trials: int = 5,
               ppl_windows: int = 1, ppl_texts: Sequence[PplText] = ()) -> int:
    """How many progress steps ``run_eval`` reports in all (for a progress bar's total); ``ppl_texts`` as loaded by
    :func:`~patchattn.eval.ppl_texts.load_ppl_texts`."""
    steps = sum(ppl_windows if task == "ppl" or text is not None else 1 if task == "speed" else trials
                for _, task, text in _plan(lengths, tasks, ppl_texts))
    return steps * len(variants)


def _plan(lengths: Sequence[int], tasks: Sequence[str], texts: Sequence[PplText]) -> list[tuple[int, str, PplText | None]]:
    """The rows of one variant in run order, as (length, task, text or None): per length each task, each text's
    perplexity just after ``ppl`` (first without it), where the text is long enough."""
    at = tasks.index("ppl") + 1 if "ppl" in tasks else 0
    order = [(t, None) for t in tasks[:at]] + [(text.task, text) for text in texts] + [(t, None) for t in tasks[at:]]
    return [(n, task, text) for n in sorted(set(lengths)) for task, text in order if text is None or text.fits(n)]


def _variant_info(recipe: Recipe | None) -> dict:
    if recipe is None:
        return {"recipe": None, "dense": True}
    calibration = recipe.calibration or {}
    heads = {(h.strategy, tuple(sorted(h.params.items()))) for layer in recipe.layers for h in layer}
    info = {
        "recipe": getattr(recipe, "name", None) or None,
        "dense": False,
        "block_size": recipe.block_size,
        "strategy_counts": recipe.strategy_counts(),
        "mean_density": recipe.mean_density,
        "calibration_seq_len": calibration.get("seq_len"),
        "calibrated_sparsity": calibration.get("achieved_sparsity"),
        "plan_hash": recipe.plan_hash(),
    }
    if len(heads) == 1 and next(iter(heads))[0] != "dense":
        strategy, params = next(iter(heads))
        info["uniform"] = f"{strategy} {dict(params)}"
    if recipe.compresses_kv:
        info["kv_policy_counts"] = recipe.kv_policy_counts()
    return info


def task_prompts(task: str, tokenizer, length: int, limit: int | None, trials: int, seed: int) -> list[Prompt]:
    """``trials`` prompts; shortened by the reply length where prompt plus reply would overrun the context."""
    prompts = []
    for trial in range(trials):
        trial_seed = seed * 10_000 + trial
        prompt = build_prompt(task, tokenizer, length, trial_seed)
        if limit is not None and length + prompt.max_new_tokens > limit:
            prompt = build_prompt(task, tokenizer, limit - prompt.max_new_tokens, trial_seed)
        prompts.append(prompt)
    return prompts


def run_eval(
    model,
    tokenizer,
    variants: Mapping[str, Recipe | None],
    lengths: Sequence[int],
    tasks: Sequence[str] = DEFAULT_TASKS,
    trials: int = 5,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    model_name: str | None = None,
    backend: str = "auto",
    on_row: Callable[[dict], None] | None = None,
    speed_runs: int = 3,
    cuda_graphs: bool | None = None,
    ppl_windows: int = 1,
    ppl_texts: Sequence[str | os.PathLike | PplText] = (),
) -> dict:
    """Evaluate each variant on the same prompts. ``variants`` maps a display name to a Recipe, or to
    None for the unpatched model; name the baseline ``"dense"`` for the report's deltas.
    ``progress(advance, description)`` is called before each block (advance 0) and after each trial
    (advance 1); ``eval_steps`` gives the total. ``on_row(results)`` is called after each finished row with the
    results so far (``"complete": False`` until the last row), so a caller can save them as they come.
    ``speed_runs``: timed runs per speed measurement (after a warm-up); the medians are reported. The speed rows'
    sparsity comes from one more, untimed prefill (recording it reads counts back, which the timed runs must not pay).
    ``cuda_graphs``: as :func:`patchattn.patch` (short prefills replayed as CUDA graphs; default: the environment).
    ``ppl_windows``: perplexity over this many windows of held-out text (seeded starts; the first is the one-window
    run's), reported as the perplexity of all their tokens together (the geometric mean of the windows').
    ``ppl_texts``: the user's own texts (paths, or :class:`~patchattn.eval.ppl_texts.PplText` already loaded), each a
    perplexity task of its own over ``ppl_windows`` windows per length (``"ppl:" + name`` rows)."""
    paths = tuple(t for t in ppl_texts if not isinstance(t, PplText))
    EvalOptions(tuple(lengths), tuple(tasks), trials, ppl_windows, speed_runs, ppl_texts=paths)  # every option checked, as the CLI does
    if speed_runs < 1:
        raise OptionError("speed_runs", "must be at least 1 here (leave the speed task out instead of 0 runs)")
    if not variants:
        raise ValueError("no variants to evaluate")
    lengths = sorted(set(int(n) for n in lengths))
    check_lengths(model, lengths)
    texts = load_ppl_texts(tokenizer, ppl_texts, lengths) if ppl_texts else []
    plan = _plan(lengths, list(tasks), texts)
    limit = context_length(model.config)
    report = progress or (lambda advance, description: None)
    results: list[dict] = []
    header = {
        "schema_version": SCHEMA_VERSION,
        "model": model_name or _model_name(model),
        "lengths": lengths,
        "tasks": list(tasks),
        "trials": trials,
        "seed": seed,
        "speed_runs": speed_runs,
        "ttft_interleaved": "speed" in tasks,
        "ppl_windows": ppl_windows,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(model),
        "variants": {name: _variant_info(recipe) for name, recipe in variants.items()},
        "ppl_texts": [text.info(lengths) for text in texts],
    }
    speed_recipes = _speed_recipes(model, tokenizer, variants, lengths, header) if "speed" in tasks else {}
    n_rows = len(plan) * len(variants)
    for length, task, text in plan:
        inputs = _task_inputs(task, text, tokenizer, length, limit, trials, seed, ppl_windows)
        ttfts = {}
        if task == "speed":  # every variant's time to first token, round by round (patchattn.eval.interleaved)
            report(0, f"{length} tokens · speed · time to first token, variants interleaved")
            ttfts = interleaved_ttft(model, {
                name: functools.partial(patched, model, speed_recipes.get(name, recipe), backend, cuda_graphs)
                for name, recipe in variants.items()}, inputs[0], speed_runs, speed_generate_kwargs(model))
        for name, recipe in variants.items():
            description = f"{length} tokens · {task} · {name}"
            report(0, description)
            started = time.perf_counter()
            run = _VariantRun(task, is_ppl=task == "ppl" or text is not None, ttft_runs=ttfts.get(name))
            runs = speed_recipes.get(name, recipe) if task == "speed" else recipe
            with patched(model, runs, backend if task == "speed" else quality_backend(backend), cuda_graphs), record_sparsity() as record:
                for item in inputs:
                    run.measure(model, tokenizer, item, speed_runs, record)
                    report(1, description)
            row = run.row(length, name, recipe, record, inputs, started)
            if text is not None:
                row["text"] = text.path
            logger.info("%s: %s %.4g (sparsity %s)", description, row["metric"], row["value"], row["sparsity"])
            results.append(row)
            if on_row is not None:
                on_row({**header, "results": list(results), "complete": len(results) == n_rows})
    return {**header, "results": results, "complete": True}


def _speed_recipes(model, tokenizer, variants: Mapping[str, Recipe | None], lengths: Sequence[int], header: dict) -> dict:
    """The recipes the speed rows run: each variant's own, or a copy with the prefill break-even of this GPU fitted on
    held-out prose at the longest length (:mod:`patchattn.eval.break_even`), recorded in the header's variant info."""
    runs: dict[str, Recipe] = {}
    fit_ids = None
    for name, recipe in variants.items():
        if recipe is None:
            continue
        if fit_ids is None:
            fit_ids = ppl_input_ids(tokenizer, max(lengths))
        runs[name], fitted = break_even.for_speed(model, recipe, fit_ids)
        if fitted is not None:
            header["variants"][name]["speed_break_even"] = fitted
    return runs


def _task_inputs(task: str, text: PplText | None, tokenizer, length: int, limit: int | None, trials: int, seed: int,
                 ppl_windows: int) -> list:
    """What every variant runs for one row: perplexity windows (token lists), the speed prompt, or needle prompts."""
    if text is not None:
        return text.windows(length, ppl_windows, seed)
    if task == "ppl":  # window 0 is the text a one-window run reads; the others start elsewhere
        return [ppl_input_ids(tokenizer, length, window_seed(seed, w)) for w in range(ppl_windows)]
    if task == "speed":  # the generation must fit in the context too
        fits = length if limit is None else min(length, limit - SPEED_DECODE_TOKENS - 1)
        return [ppl_input_ids(tokenizer, fits, seed)]
    return task_prompts(task, tokenizer, length, limit, trials, seed)


@dataclass
class _VariantRun:
    """What one variant measured on one row's inputs (inside its patch and sparsity record), and the row it makes."""

    task: str
    is_ppl: bool  # the shipped text's perplexity or a --ppl-text one
    scores: list[float] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)
    kv_cache: set = field(default_factory=set)
    speed: SpeedResult | None = None
    ttft_runs: list[float] | None = None  # the speed task's times to first token, timed interleaved with the others'

    def measure(self, model, tokenizer, item, speed_runs: int, record) -> None:
        if self.is_ppl:
            self.scores.append(perplexity(model, item))
            return
        if self.task == "speed":
            with record.paused():
                result = measure_speed(model, item, SPEED_DECODE_TOKENS, speed_runs)
                if self.ttft_runs:
                    result = dataclasses.replace(result, ttft_ms=round(statistics.median(self.ttft_runs), 3),
                                                 ttft_runs_ms=[round(x, 3) for x in self.ttft_runs])
                self.speed = result
            prefill(model, torch.tensor([item]))  # untimed: the sparsity of what was timed
            self.scores.extend(result.ttft_runs_ms)
        else:
            result = answer(model, tokenizer, item)
            self.scores.append(result.score)
            self.replies.append(result.reply)
        if result.kv_bytes is not None:
            self.kv_bytes.append(result.kv_bytes)
        self.kv_cache.add(result.kv_cache)

    def row(self, length: int, variant: str, recipe: Recipe | None, record, inputs: list, started: float) -> dict:
        """The results row (see the module's docstring); ``started``: when the variant began, by ``time.perf_counter``."""
        scores, speed = self.scores, self.speed
        sparsity = 0.0 if recipe is None else record.sparsity
        row = {
            "length": length,
            "task": self.task,
            "variant": variant,
            "metric": "perplexity" if self.is_ppl else {"speed": "ttft_ms"}.get(self.task, "accuracy"),
            "value": (math.exp(sum(math.log(x) for x in scores) / len(scores)) if self.is_ppl
                      else speed.ttft_ms if speed else sum(scores) / len(scores)),
            "sparsity": None if sparsity is None else float(sparsity),
            "trials": len(inputs),
            "scores": scores,
            "replies": self.replies,
            "prompt_tokens": [item.length_tokens if isinstance(item, Prompt) else len(item) for item in inputs],
            "seconds": round(time.perf_counter() - started, 3),
            "kv_bytes": round(sum(self.kv_bytes) / len(self.kv_bytes)) if self.kv_bytes else None,
            "kv_cache": _kv_cache_of(self.kv_cache),
            # which implementation ran each patched layer's prefill: calls per kernel (see patchattn.stats)
            "prefill_kernels": None if recipe is None else dict(record.kernels),
        }
        if speed is not None:
            row.update(
                ms_per_token=speed.ms_per_token, ms_per_token_runs=speed.ms_per_token_runs,
                decode_tokens=SPEED_DECODE_TOKENS, peak_bytes=speed.peak_bytes, peak_memory=speed.peak_memory,
                device=speed.device, decode=speed.decode_path,
            )
        return row


def _model_name(model) -> str:
    return (
        getattr(model, "patchattn_source", None)
        or getattr(model.config, "name_or_path", None)
        or getattr(model, "name_or_path", None)
        or type(model).__name__
    )


def _kv_cache_of(statuses: set) -> str | None:
    """A row's KV cache status from its generations' (see :func:`patchattn.cache_hooks.kv_cache_status`): the first
    reason any of them ran on the full cache, else ``"budgeted"``, else None (the recipe keeps the full cache)."""
    full = sorted(s for s in statuses if s and s != "budgeted")
    return full[0] if full else ("budgeted" if "budgeted" in statuses else None)


def _environment(model) -> dict:
    import transformers

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        # every device holding parameters (a model accelerate spread over several GPUs has more than one)
        "devices": sorted({str(p.device) for p in model.parameters()}),
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


def _device_name(device: torch.device) -> str | None:
    """The GPU's name, or the CPU's model name (Linux: /proc/cpuinfo), for labelling speed figures."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
