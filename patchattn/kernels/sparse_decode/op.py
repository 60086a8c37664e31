"""Page-sparse decode attention as one PyTorch custom op, ``torch.ops.patchattn.sparse_decode``.

Why: ``torch.compile`` (and so a graph-captured decode step) cannot trace through the backend choice of
:func:`patchattn.kernels.sparse_decode`: it is Python that looks at devices, dtypes and whether Triton imports,
and the Triton launch itself is opaque to the tracer. Registered with ``torch.library``, the whole call is one op
in the graph: the tracer sees only its fake implementation (an empty tensor shaped like ``q``), and the real
implementation -- Triton where the kernel takes the input, the PyTorch reference otherwise -- runs when the
graph runs. ``torch.compile(fullgraph=True)`` then traces a decode step without a graph break.

The op's contract is :func:`patchattn.kernels.sparse_decode.naive.sparse_decode_naive`'s, with ``scale`` a
concrete float (:func:`sparse_decode_op` resolves the default ``1 / sqrt(D)``). It returns a new contiguous
tensor. It has no autograd formula: decode runs without gradients.

On a torch without ``torch.library.custom_op`` (or when registering fails) nothing is registered and
:func:`sparse_decode_op` calls the same implementation directly (logged at debug level): eager code works the
same, only compiled code breaks its graph there.
"""

from __future__ import annotations

import logging
import math

import torch

from .naive import sparse_decode_naive

logger = logging.getLogger(__name__)

OP_NAME = "patchattn::sparse_decode"
MAX_CHOICES = 256  # remembered backend choices; beyond it the memory starts over (shapes rarely vary that much)
_CHOICES: dict[tuple, object] = {}  # shape/dtype/device key -> sparse_decode_naive or the Triton kernel's entry point


def _choice_key(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size) -> tuple:
    """What the backend choice and the input checks depend on: everything but the cache length and the page-list
    length, which change from step to step (only whether K and V have the same length matters)."""
    return (
        q.device, k_cache.device, v_cache.device, q.dtype, k_cache.dtype, v_cache.dtype, q.shape,
        k_cache.dim(), k_cache.shape[:2], k_cache.shape[3:], v_cache.dim(), v_cache.shape[:2], v_cache.shape[3:],
        k_cache.shape[2:3] == v_cache.shape[2:3], page_ids.shape[:2], page_counts.shape, seq_lens.shape, page_size,
    )


def _pick(q, k_cache, v_cache, page_size):
    """The Triton kernel where :func:`patchattn.kernels._decode_triton_unsupported` allows it, else the reference."""
    from .. import _decode_triton_unsupported  # the packages import this module: import at call time
    from . import load_triton_kernel

    if _decode_triton_unsupported(q, k_cache, v_cache, page_size) is None:
        return load_triton_kernel().sparse_decode_triton
    return sparse_decode_naive


def op_backend(q, k_cache, v_cache, page_size) -> str:
    """Which implementation the op runs for inputs like these: "triton" or "torch"."""
    return "torch" if _pick(q, k_cache, v_cache, page_size) is sparse_decode_naive else "triton"


def _sparse_decode_impl(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size: int, scale: float) -> torch.Tensor:
    """The op's real implementation. The backend is chosen once per :func:`_choice_key`; that first call also checks
    the inputs (the Triton kernel's ``validate``), later ones with the same key skip the checks."""
    key = _choice_key(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size)
    run = _CHOICES.get(key)
    validate = run is None
    if validate:
        run = _pick(q, k_cache, v_cache, page_size)
    if run is sparse_decode_naive:  # no checks of its own: it is the reference
        out = sparse_decode_naive(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale)
    else:  # a fresh contiguous output, the layout the fake implementation promises
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        run(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale, out=out, validate=validate)
    if validate:  # remembered only once a call went through
        if len(_CHOICES) >= MAX_CHOICES:
            _CHOICES.clear()
        _CHOICES[key] = run
    return out


def _register():
    """``torch.ops.patchattn.sparse_decode``, registered now (or found registered), or None when this torch cannot."""
    custom_op = getattr(getattr(torch, "library", None), "custom_op", None)
    if custom_op is None:
        logger.debug("torch %s has no torch.library.custom_op: sparse_decode_op calls its implementation directly", torch.__version__)
        return None
    namespace = getattr(torch.ops, "patchattn")
    if hasattr(namespace, "sparse_decode"):  # this module ran before (re-imported): keep the first registration
        return namespace.sparse_decode.default
    try:
        @custom_op(OP_NAME, mutates_args=())
        def sparse_decode(
            q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_ids: torch.Tensor,
            page_counts: torch.Tensor, seq_lens: torch.Tensor, page_size: int, scale: float,
        ) -> torch.Tensor:
            return _sparse_decode_impl(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale)

        @sparse_decode.register_fake
        def _(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale):
            return torch.empty_like(q, memory_format=torch.contiguous_format)
    except Exception as exc:  # pragma: no cover - depends on the torch version
        logger.debug("registering %s failed (%s: %s): sparse_decode_op calls its implementation directly", OP_NAME, type(exc).__name__, exc)
        return None
    return namespace.sparse_decode.default


OP = _register()


def sparse_decode_op(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size: int, scale: float | None = None) -> torch.Tensor:
    """Page-sparse decode attention through the custom op (contract: :func:`sparse_decode_naive`); ``scale``
    defaults to ``1 / sqrt(D)``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if OP is None:
        return _sparse_decode_impl(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale)
    return OP(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale)


__all__ = ["OP", "OP_NAME", "op_backend", "sparse_decode_op"]
