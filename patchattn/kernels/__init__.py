"""Sparse attention kernels and their dispatch: block-sparse prefill and page-sparse decode.

``sparse_prefill`` picks a backend: ``"triton"`` (the fused GPU kernel, fp16/bf16, head dim 64, 128 or 256,
block size 64 or 128, no ``attn_mask``; on Hopper GPUs with block size 128, head dim 128 and no token columns the
warp-specialised Gluon kernel of :mod:`.sparse_prefill.hopper`, written in Triton's lower-level language) or ``"torch"`` (the plain-PyTorch reference, any device, dtype and
mask). ``"auto"`` takes Triton whenever it can and the reference otherwise. Triton is an optional
dependency: without it the package imports fine and only the torch backend exists.
"""

from __future__ import annotations

import functools
import os

import torch

from . import ragged as _ragged_pkg
from . import sparse_decode as _sparse_decode_pkg
from .sparse_decode import sparse_decode_naive, sparse_decode_triton
from .sparse_prefill import load_hopper_kernel, load_triton_kernel, sparse_prefill_naive, sparse_prefill_triton, triton_import_error

BACKENDS = ("auto", "torch", "triton")


def available_backends() -> list[str]:
    """Backends usable in this process: always "torch"; "triton" when CUDA is present and Triton imports."""
    backends = ["torch"]
    if torch.cuda.is_available() and load_triton_kernel() is not None:
        backends.append("triton")
    return backends


def triton_prefill_unsupported(q, k, v, block_size, attn_mask=None) -> str | None:
    """Why the Triton backend cannot take this prefill (``sparse_prefill(..., backend="auto")`` then runs the
    PyTorch reference), or None."""
    if not q.is_cuda:
        return f"q is on {q.device}, the Triton kernel needs a CUDA tensor"
    if k.device != q.device or v.device != q.device:
        return "q, k and v must be on the same device"
    if attn_mask is not None:
        return "attn_mask is not supported by the Triton kernel (use backend='torch')"
    mod = load_triton_kernel()
    if mod is None:
        return f"triton is not importable ({triton_import_error()})"
    return mod.unsupported_reason(q, k, v, block_size)


def hopper_kernel_enabled() -> bool:
    """Whether the Triton backend may use the Gluon kernel on Hopper GPUs (``PATCHATTN_GLUON=0`` turns it off)."""
    return os.environ.get("PATCHATTN_GLUON", "1") != "0"


def _prefill_choice(q, k, v, block_size, attn_mask, columns, backend, window=0) -> tuple[str, str | None]:
    """(the implementation :func:`sparse_prefill` runs, why not Triton when it falls back to the reference)."""
    if backend == "torch":
        return "torch", None
    reason = triton_prefill_unsupported(q, k, v, block_size, attn_mask)
    if reason is not None:
        return "torch", reason
    if columns is None and not window and hopper_kernel_enabled():
        hopper = load_hopper_kernel()
        if hopper is not None and q.shape[-1] in hopper.DISPATCH_HEAD_DIMS and hopper.hopper_reason(q, block_size) is None:
            return "gluon-hopper", None
    return "triton", None


def prefill_kernel(q, k, v, block_size, attn_mask=None, columns=None, backend="auto", window=0) -> str:
    """Which implementation :func:`sparse_prefill` runs for these inputs: "gluon-hopper" (the warp-specialised
    kernel of :mod:`.sparse_prefill.hopper`: Hopper GPUs, block size 128, head dim 128, no token columns), "triton" or
    "torch"."""
    return _prefill_choice(q, k, v, block_size, attn_mask, columns, backend, window)[0]


def sparse_prefill(q, k, v, kv_block_counts, kv_block_ids, block_size, scale=None, attn_mask=None, backend="auto", density=None,
                   columns=None, window=0):
    """Block-sparse causal attention; same contract as :func:`sparse_prefill_naive`.

    ``backend``: "auto" (Triton when q is on CUDA, Triton imports, dtype is fp16/bf16, head dim and block
    size are supported and there is no ``attn_mask``; the torch reference otherwise), "torch" or "triton"
    (raises ValueError saying why when the input is unsupported). ``density``: the share of causal blocks the layout
    keeps (:func:`patchattn.layout.to_ragged`), which picks the Triton kernel's tile shapes. ``columns``: token
    columns besides the blocks, as ``(columns, column_counts, keep)`` (see :func:`sparse_prefill_triton`). ``window``:
    the model's sliding window in positions (0: none); the layout must be finished with it
    (``window_rows`` of :func:`patchattn.layout.finalize`, from :func:`patchattn.layout.window_blocks`).
    """
    cols, col_counts, col_keep = columns if columns is not None else (None, None, None)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    naive = lambda: sparse_prefill_naive(  # noqa: E731
        q, k, v, kv_block_counts, kv_block_ids, block_size, scale=scale, attn_mask=attn_mask, columns=cols, column_counts=col_counts,
        window=window,
    )
    kernel, reason = _prefill_choice(q, k, v, block_size, attn_mask, columns, backend, window)
    if kernel == "gluon-hopper":
        return load_hopper_kernel().sparse_prefill_hopper(q, k, v, kv_block_counts, kv_block_ids, block_size, scale=scale)
    if kernel == "triton":
        return sparse_prefill_triton(
            q, k, v, kv_block_counts, kv_block_ids, block_size, scale=scale, density=density,
            columns=cols, column_counts=col_counts, column_keep=col_keep, window=window,
        )
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run this input: {reason}")
    return naive()


def finalize_ragged(
    keep: torch.Tensor, backend: str = "auto", dense_rows: int = 0, sync: bool = True, window_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """A raw layout finished for the kernels: :func:`patchattn.layout.finalize` then :func:`patchattn.layout.to_ragged`,
    as one Triton launch on CUDA (``backend`` "auto" or "triton"; the PyTorch reference elsewhere or with "torch").
    ``sync=False`` (Triton only, for CUDA graphs): nothing read back, full-width ids, density None."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    use_triton = backend != "torch" and (keep.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" and backend == "triton")
    if use_triton and _ragged_pkg.load_triton_kernel() is not None:
        return _ragged_pkg.finalize_ragged_triton(keep, dense_rows, sync=sync, window_rows=window_rows)
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot finish this layout: {_ragged_pkg.triton_import_error() or 'not a CUDA tensor'}")
    return _ragged_pkg.finalize_ragged_naive(keep, dense_rows, window_rows)


# ------------------------------------------------------------------------------------ decode (one query token)

def _decode_triton_unsupported(q, k_cache, v_cache, page_size) -> str | None:
    """Why the Triton decode kernel cannot take this call, or None (CPU tensors only under TRITON_INTERPRET=1)."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"q is on {q.device}, the Triton kernel needs a CUDA tensor (or Triton's interpreter)"
    if k_cache.device != q.device or v_cache.device != q.device:
        return "q, k_cache and v_cache must be on the same device"
    mod = _sparse_decode_pkg.load_triton_kernel()
    if mod is None:
        return f"triton is not importable ({_sparse_decode_pkg.triton_import_error()})"
    return mod.unsupported_reason(q, k_cache, v_cache, page_size)


def decode_function(q, k_cache, v_cache, page_size, backend="auto", validate=False):
    """The decode implementation for inputs like these, as a function of ``(q, k_cache, v_cache, page_ids,
    page_counts, seq_lens, page_size, scale=None)``: callers that decode the same shapes step after step choose
    once and (``validate=False``) skip the kernel's per-call checks. Backends as in :func:`sparse_decode`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return sparse_decode_naive
    reason = _decode_triton_unsupported(q, k_cache, v_cache, page_size)
    if reason is None:
        return functools.partial(_sparse_decode_pkg.load_triton_kernel().sparse_decode_triton, validate=validate)
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run this input: {reason}")
    return sparse_decode_naive


def sparse_decode(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale=None, backend="auto"):
    """Page-sparse attention of one new token; same contract as :func:`sparse_decode_naive`.

    ``backend``: "auto" (Triton when q is on CUDA, Triton imports, dtype is fp16/bf16 and head dim and page
    size are supported; the torch reference otherwise), "torch" or "triton" (raises ValueError saying why when
    the input is unsupported).
    """
    decode = decode_function(q, k_cache, v_cache, page_size, backend, validate=True)
    return decode(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale=scale)


__all__ = [
    "available_backends",
    "decode_function",
    "finalize_ragged",
    "sparse_decode",
    "sparse_decode_naive",
    "sparse_decode_triton",
    "sparse_prefill",
    "sparse_prefill_naive",
    "sparse_prefill_triton",
    "prefill_kernel",
    "hopper_kernel_enabled",
    "triton_prefill_unsupported",
]
