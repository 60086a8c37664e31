"""CUDA graphs for a patched layer's prefill attention on short prompts (opt-in).

Building a layer's layout takes dozens of small launches (estimates, top-k, the finisher) and, eagerly, one read-back
of the longest row. On a small model at a few thousand tokens that host time is several times the attention it
skips. Captured once per (layer, shape), the whole path -- estimate, layout, finisher, column counts, kernel -- replays
as one graph: the finisher returns its full-width ids without reading anything back, and the kernel's tile shapes
come from the layer's calibrated density instead of the measured one.

Enabled by ``patch(model, recipe, cuda_graphs=True)`` or ``PATCHATTN_CUDA_GRAPHS=1``, for prompts up to
:data:`MAX_TOKENS` (each graph keeps its layer's intermediates: the (B, H, n, n) layout and ids). Never used while
sparsity is being recorded (that needs the counts on the host), with a model mask, or off CUDA. Each new prompt
shape costs one capture per layer (two eager warm-up runs and the capture): it pays when the same lengths recur
(serving with padded length buckets, benchmarks), not for one-off prompts of every length.

Measured (H100, SmolLM2-135M's shape with random weights, bf16, `benchmarks/prefill_overhead.py`, 2026-11-24): the
token-column 80% recipe's prefill at 8K took 137.7 ms eagerly and 44.1 ms graphed (dense SDPA 23.6 ms); the
block-only one 75.7 -> 33.3 ms (dense 21.9); at 2K 102.3 -> 28.4 ms (dense 29.4).
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Callable

import torch

logger = logging.getLogger(__name__)

ENV = "PATCHATTN_CUDA_GRAPHS"
MAX_TOKENS = 16384
MAX_GRAPHS = 256  # per recipe; beyond it the oldest graph is dropped (prompts of many lengths each capture their own)
_POOL = None  # one memory pool for every graph: layers replay one after another
_LIVE: "weakref.WeakSet[GraphedAttention]" = weakref.WeakSet()  # the graphs captured into _POOL that still exist


def _pool():
    """The shared pool's handle. The caching allocator frees a private pool with the last graph captured into it, and
    a capture into a freed pool's handle fails (an internal assert): once every graph is gone (a patch left, a cache
    emptied), the next capture takes a new handle."""
    global _POOL
    if _POOL is None or not _LIVE:
        _POOL = torch.cuda.graph_pool_handle()
    return _POOL


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


class GraphedAttention:
    """``fn(q, k, v) -> out`` captured on static copies of its inputs; calling it copies the inputs in, replays, and
    returns a copy of the output (the pool is shared with the next layer's graph)."""

    def __init__(self, fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.inputs = [t.clone() for t in (q, k, v)]
        side = torch.cuda.Stream(device=q.device)
        side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side):  # warm-up: compiles kernels, fills the per-head parameter caches
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream(q.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=_pool()):
            self.output = fn(*self.inputs)
        _LIVE.add(self)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for static, new in zip(self.inputs, (q, k, v)):
            static.copy_(new)
        self.graph.replay()
        return self.output.clone()


def graph_for(cache: dict, key: tuple, fn: Callable, q, k, v) -> GraphedAttention | None:
    """The graph cached under ``key``, captured on first use; None (and never retried) where capture fails."""
    if key in cache:
        return cache[key]
    while len(cache) >= MAX_GRAPHS:
        cache.pop(next(iter(cache)))
    try:
        cache[key] = GraphedAttention(fn, q, k, v)
        logger.debug("captured a CUDA graph for %s", key)
    except Exception as exc:  # e.g. an op that synchronises: run eagerly from now on
        logger.warning("CUDA graph capture failed for %s (%s); running eagerly", key, exc)
        cache[key] = None
    return cache[key]
