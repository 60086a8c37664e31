"""Time to first token with the variants' runs interleaved, round by round.

A launch-bound model drifts by more than the difference between two variants when each variant's runs come minutes
apart. On an H100, SmolLM2-135M prefills 2-8K tokens in ~30 ms, and eval once read dense's seven runs at 2K steady at
27.6-28.1 ms while the patched model's, on the very same prefill code, fell from 40.4 to 26.9 ms over its seven. So
the speed rows' times to first token are timed here: each round runs every variant once, in turn, as ``generate`` of
one token (prefill, the cache's set-up and the first token, as in the speed rows' own generations; no decode step, so
no compile), each after one untimed run inside the same patch on a GPU (a patch's first forward may capture CUDA
graphs; on a CPU only the first round has one).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Callable, Mapping

import torch


def first_token_ms(model, ids: torch.Tensor, generate_kwargs: dict) -> float:
    """Milliseconds from the ``generate`` call to its one token (the device synchronised before and after)."""
    device = ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    sync(device)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1, **generate_kwargs)
    sync(device)
    return (time.perf_counter() - start) * 1e3


def interleaved_ttft(model, variants: Mapping[str, Callable[[], AbstractContextManager]], input_ids: list[int],
                     rounds: int, generate_kwargs: dict) -> dict[str, list[float]]:
    """Per variant, its time to first token in each of ``rounds`` rounds (ms). ``variants`` maps a name to a
    zero-argument callable that returns the context the variant runs in (its patch; a null context for dense)."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    ids = torch.tensor([input_ids], device=model.get_input_embeddings().weight.device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for round_ in range(rounds):
            for name, enter in variants.items():
                with enter():
                    if round_ == 0 or ids.is_cuda:  # untimed: the patch's first forward (on a GPU, each entry's)
                        first_token_ms(model, ids, generate_kwargs)
                    times[name].append(first_token_ms(model, ids, generate_kwargs))
    return times
