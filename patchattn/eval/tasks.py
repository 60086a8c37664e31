"""The eval tasks, generic over causal LMs: perplexity on held-out prose, and greedy-decoded needle tasks.

Both run whatever attention the model is set to; the runner wraps them in ``patched`` and
``record_sparsity``. Perplexity never materialises (length x vocab) logits: the base model's hidden
states go through the output embedding a chunk of positions at a time.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from .. import decode_graphs, hf
from ..cache_hooks import kv_cache_status
from .haystack import Prompt, _stream, score

logger = logging.getLogger(__name__)

PPL_TEXT = "heldout"
LOGITS_CHUNK_ELEMENTS = 1 << 26  # positions x vocab per chunk: 256 MB of float32 logits


def _special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before text by default (a BOS for Llama-style tokenizers), if any."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def window_seed(seed: int | str, window: int) -> int | str:
    """The seed of perplexity window ``window`` (0, 1, ...): window 0 reads what a one-window run reads."""
    return seed if window == 0 else f"{seed}-window{window}"


def ppl_input_ids(tokenizer, length_tokens: int, seed: int | str = 0) -> list[int]:
    """``length_tokens`` tokens of held-out prose from a seeded start (tiled if the text is shorter)."""
    stream = _stream(tokenizer, PPL_TEXT)
    prefix = _special_prefix(tokenizer)
    start = random.Random(f"patchattn-eval:ppl:{seed}").choice(stream.sentence_starts)
    n = len(stream.ids)
    return prefix + [stream.ids[(start + i) % n] for i in range(length_tokens - len(prefix))]


def _postprocess_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """What some models do to lm_head output inside their forward (scaling, soft-capping)."""
    config = hf.text_config(model.config)
    scale = getattr(config, "logit_scale", None)  # Cohere multiplies
    if isinstance(scale, (int, float)) and scale not in (0, 1):
        logits = logits * scale
    divide = getattr(config, "logits_scaling", None)  # Granite divides
    if isinstance(divide, (int, float)) and divide not in (0, 1):
        logits = logits / divide
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _head_matches(model, head, input_ids: torch.Tensor, n_check: int = 16) -> bool:
    """Whether base model + output embedding reproduce the model's logits, on the first few positions run alone.
    Both sides come from the same short forward: the first rows of a long one can differ by more than rounding
    (in bfloat16 a long prompt's attention kernels are not the short one's), and that is not what is checked."""
    ids = input_ids[:, : min(n_check, input_ids.shape[1])]
    reference = model(input_ids=ids, use_cache=False).logits[0].float()
    ours = _postprocess_logits(model, head(model.base_model(input_ids=ids, use_cache=False)[0][0])).float()
    return bool((ours - reference).abs().max() <= 0.02 * reference.abs().max() + 1e-3)


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Negative log-likelihood (float32, shape (N-1,)) of each token after the first, for one sequence
    ``input_ids`` of shape (1, N). Logits are made ``chunk_tokens`` positions at a time."""
    head = model.get_output_embeddings()
    if not _head_matches(model, head, input_ids):
        logger.warning("%s: chunked logits differ from the model's own; computing full logits", type(model).__name__)
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="none")
    hidden = model.base_model(input_ids=input_ids, use_cache=False)[0]  # (1, N, hidden)
    vocab = head.weight.shape[0]
    chunk = chunk_tokens or max(1, LOGITS_CHUNK_ELEMENTS // vocab)
    targets = input_ids[0, 1:]
    nll = torch.empty(targets.shape[0], dtype=torch.float32, device=input_ids.device)
    for start in range(0, targets.shape[0], chunk):
        end = min(start + chunk, targets.shape[0])
        logits = _postprocess_logits(model, head(hidden[0, start:end])).float()
        nll[start:end] = torch.nn.functional.cross_entropy(logits, targets[start:end], reduction="none")
    return nll


def perplexity(model, input_ids: list[int] | torch.Tensor) -> float:
    """exp(mean NLL) of ``input_ids`` under ``model``, in one forward pass."""
    device = model.get_input_embeddings().weight.device
    ids = torch.as_tensor(input_ids, device=device).reshape(1, -1)
    return math.exp(token_nll(model, ids).mean().item())


@dataclass
class NeedleResult:
    score: float
    reply: str
    kv_bytes: int | None = None  # what the KV cache held at the end of generation
    kv_cache: str | None = None  # "budgeted", "full: <why>" when the recipe's KV plans were not in effect, else None


def cache_bytes(cache) -> int | None:
    """Bytes a transformers cache holds (the budgeted cache counts its pools and page bounds)."""
    if cache is None:
        return None
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    layers = getattr(cache, "layers", [])
    return sum(t.numel() * t.element_size() for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))


@torch.no_grad()
def answer(model, tokenizer, prompt: Prompt) -> NeedleResult:
    """Greedy-decode ``prompt.max_new_tokens`` tokens and score the reply."""
    from transformers import GenerationConfig

    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([prompt.input_ids], device=device)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    config = GenerationConfig(max_new_tokens=prompt.max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, return_dict_in_generate=True)
    reply = tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)
    cache = hf.output_cache(out)
    result = NeedleResult(score(prompt, reply), reply, cache_bytes(cache), kv_cache_status(model, cache))
    logger.debug("%s %d tokens: expected %s, reply %r -> %s", prompt.task, prompt.length_tokens, prompt.answers, reply, result.score)
    return result


@dataclass
class SpeedResult:
    ttft_ms: float  # median time from the generate call to the first token (prefill, cache set-up, first token)
    ms_per_token: float  # median of each run's mean time per generated token after it (greedy, model's own cache)
    peak_bytes: int | None  # median over runs of the peak memory of one generation (see ``peak_memory``)
    peak_memory: str | None  # what peak_bytes measures: "cuda_allocated" or "process_rss"; None if unmeasured
    kv_bytes: int | None  # the KV cache at the end of a generation
    device: str
    ttft_runs_ms: list[float]  # each timed run's, warm-up excluded
    ms_per_token_runs: list[float]  # each timed run's, warm-up excluded
    kv_cache: str | None = None  # as NeedleResult.kv_cache
    decode_path: str = "eager"  # how the decode steps ran: "cuda-graph", "torch.compile" or "eager" (see decode_path)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory of one run on ``device``: CUDA's allocator peak (``"cuda_allocated"``), or on a CPU the
    process's peak resident set size (``"process_rss"``, Linux: VmHWM, reset through /proc/self/clear_refs;
    it counts the weights and whatever the allocator kept, not only this run's tensors). None elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "process_rss" if self._rss_resettable() else None

    @staticmethod
    def _rss_resettable() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return _vm_hwm_bytes() is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "process_rss":
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS

    def peak_bytes(self) -> int | None:
        if self.kind == "cuda_allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "process_rss":
            return _vm_hwm_bytes()
        return None


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


class _TokenClock:
    """A stopping criterion that never stops: it notes the time each generated token is ready (after a device sync)."""

    def __init__(self, device: torch.device):
        from transformers import StoppingCriteriaList

        self.device, self.times = device, []
        self.criteria = StoppingCriteriaList([self])

    def __call__(self, input_ids, scores, **kwargs):
        import time

        _sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _decode_counts(model) -> dict:
    runner = decode_graphs.runner_for(model)
    return dict(runner.paths) if runner is not None else {}


def decode_path(model, device, before: dict) -> str:
    """How the decode steps of the generation since ``before`` (:func:`_decode_counts`) ran: "cuda-graph" (a patched
    model's steps replayed, :mod:`patchattn.decode_graphs`), "torch.compile" (generate's compile path: transformers'
    own, for a dense model or a patched one whose cache was not budgeted) or "eager"."""
    runner = decode_graphs.runner_for(model)
    if runner is not None:
        ran = {k: n - before.get(k, 0) for k, n in runner.paths.items() if n > before.get(k, 0)}
        return "cuda-graph" if ran.get("graph") else "torch.compile" if ran.get("compiled") else "eager"
    compiled = device.type == "cuda" and callable(getattr(model, "_compiled_call", None))
    return "torch.compile" if compiled else "eager"


def speed_generate_kwargs(model, fast_decode: bool = True) -> dict:
    """``generate``'s arguments for a timed greedy generation (the token counts left out). On a GPU each model decodes
    at its fastest, through generate's compile path: a static cache (dense: torch.compile; patched: CUDA graphs)."""
    kwargs = dict(do_sample=False, return_dict_in_generate=True, pad_token_id=model.generation_config.eos_token_id or 0)
    if fast_decode and model.get_input_embeddings().weight.device.type == "cuda":
        kwargs["cache_implementation"] = "static"
    return kwargs


@torch.no_grad()
def measure_speed(model, input_ids: list[int], decode_tokens: int = 16, repeats: int = 3, fast_decode: bool = True) -> SpeedResult:
    """Time to first token, ms per generated token and peak memory of one prompt, each the median of ``repeats``
    greedy generations of ``1 + decode_tokens`` tokens after one warm-up generation (not counted).

    Both times come from the same ``generate`` call, through the model's own cache: the time to first token runs
    from the call to the first token (prefill, cache set-up, first token), ms per token is the mean gap between the
    tokens after it. On a GPU each model decodes at its fastest, through generate's compile path (a static cache:
    transformers' ``torch.compile`` for a dense model, CUDA graphs of the whole step for a patched one), and
    ``decode_path`` says which ran; the warm-up run pays for the compile and the capture. ``fast_decode=False``:
    eager steps over transformers' default cache (a patched model: its budgeted one), for comparison."""
    import statistics
    import time

    if repeats < 1 or decode_tokens < 1:
        raise ValueError("repeats and decode_tokens must be at least 1")
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([input_ids], device=device)
    n_new = decode_tokens + 1
    greedy = dict(speed_generate_kwargs(model, fast_decode), max_new_tokens=n_new, min_new_tokens=n_new)
    if "cache_implementation" in greedy:
        # A fresh compile for each measurement: every length (the static cache's size) and every patch (the config's
        # recipe) recompiles the forward, and past torch's recompile limit it would silently run eager from then on.
        torch._dynamo.reset()
    memory = _PeakMemory(device)
    ttft_runs, per_token_runs, peaks, kv, kv_cache = [], [], [], None, None
    for run in range(repeats + 1):  # run 0 is the warm-up
        clock = _TokenClock(device)
        memory.reset()
        _sync(device)
        before = _decode_counts(model)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), stopping_criteria=clock.criteria, **greedy)
        if run == 0:
            continue
        path = decode_path(model, device, before)
        ttft_runs.append((clock.times[0] - start) * 1e3)
        per_token_runs.append((clock.times[-1] - clock.times[0]) * 1e3 / (len(clock.times) - 1))
        peaks.append(memory.peak_bytes())
        cache = hf.output_cache(out)
        kv, kv_cache = cache_bytes(cache), kv_cache_status(model, cache)
    peak = None if None in peaks else int(statistics.median(peaks))
    return SpeedResult(
        ttft_ms=round(statistics.median(ttft_runs), 3),
        ms_per_token=round(statistics.median(per_token_runs), 3),
        peak_bytes=peak,
        peak_memory=memory.kind if peak is not None else None,
        kv_bytes=kv,
        device=str(device),
        ttft_runs_ms=[round(x, 3) for x in ttft_runs],
        ms_per_token_runs=[round(x, 3) for x in per_token_runs],
        kv_cache=kv_cache,
        decode_path=path,
    )
