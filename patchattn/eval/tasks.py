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


def ppl_input_ids(tokenizer, length_tokens: int, seed: int = 0) -> list[int]:
    """``length_tokens`` tokens of held-out prose from a seeded start (tiled if the text is shorter)."""
    stream = _stream(tokenizer, PPL_TEXT)
    prefix = _special_prefix(tokenizer)
    start = random.Random(f"patchattn-eval:ppl:{seed}").choice(stream.sentence_starts)
    n = len(stream.ids)
    return prefix + [stream.ids[(start + i) % n] for i in range(length_tokens - len(prefix))]


def _postprocess_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """What some models do to lm_head output inside their forward (scaling, soft-capping)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
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


def _head_matches(model, head, input_ids: torch.Tensor, hidden: torch.Tensor, n_check: int = 16) -> bool:
    """Whether base model + output embedding reproduce the model's logits (on the first few positions,
    which a causal model computes the same on any length)."""
    n = min(n_check, input_ids.shape[1])
    reference = model(input_ids=input_ids[:, :n], use_cache=False).logits[0].float()
    ours = _postprocess_logits(model, head(hidden[0, :n])).float()
    return bool((ours - reference).abs().max() <= 0.02 * reference.abs().max() + 1e-3)


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Negative log-likelihood (float32, shape (N-1,)) of each token after the first, for one sequence
    ``input_ids`` of shape (1, N). Logits are made ``chunk_tokens`` positions at a time."""
    head = model.get_output_embeddings()
    hidden = model.base_model(input_ids=input_ids, use_cache=False)[0]  # (1, N, hidden)
    if not _head_matches(model, head, input_ids, hidden):
        logger.warning("%s: chunked logits differ from the model's own; computing full logits", type(model).__name__)
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="none")
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
    result = NeedleResult(score(prompt, reply), reply, cache_bytes(getattr(out, "past_key_values", None)))
    logger.debug("%s %d tokens: expected %s, reply %r -> %s", prompt.task, prompt.length_tokens, prompt.answers, reply, result.score)
    return result


@dataclass
class SpeedResult:
    ttft_ms: float  # median time of a prefill that produces the first token (logits of the last position only)
    ms_per_token: float  # median time per generated token after it (greedy, through the model's cache)
    peak_bytes: int | None  # peak device memory of one generation (CUDA only; None on CPU)
    kv_bytes: int | None  # the KV cache at the end of that generation
    device: str


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model, input_ids: list[int], decode_tokens: int = 16, repeats: int = 3) -> SpeedResult:
    """Time to first token and ms per generated token of one prompt, warm-up excluded, medians of ``repeats``.

    ms per token = (time of a generation of ``1 + decode_tokens`` tokens - its own prefill's share, the TTFT
    median) / ``decode_tokens``."""
    import statistics
    import time

    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([input_ids], device=device)
    greedy = dict(do_sample=False, return_dict_in_generate=True, pad_token_id=model.generation_config.eos_token_id or 0)

    def timed(fn):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        return (time.perf_counter() - start) * 1e3, out

    timed(lambda: model(ids, use_cache=False, logits_to_keep=1))  # warm-up
    ttft = statistics.median(timed(lambda: model(ids, use_cache=False, logits_to_keep=1))[0] for _ in range(repeats))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals, kv = [], None
    n_new = decode_tokens + 1
    for _ in range(repeats):
        ms, out = timed(lambda: model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **greedy))
        totals.append(ms)
        kv = cache_bytes(getattr(out, "past_key_values", None))
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    per_token = max(0.0, (statistics.median(totals) - ttft) / decode_tokens)
    return SpeedResult(round(ttft, 3), round(per_token, 3), peak, kv, str(device))
