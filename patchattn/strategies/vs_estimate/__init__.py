"""The vertical-slash estimate (MInference), which only :mod:`patchattn.strategies.vertical_slash` asks for: the
PyTorch reference (always), the Triton kernel (when Triton imports, on first use: see :mod:`patchattn.lazy`) and
the choice between them."""

from __future__ import annotations

import torch

from ...lazy import LazyKernel
from .naive import vertical_slash_scores_naive

_KERNEL = LazyKernel(__name__ + ".kernel")
load_triton_kernel = _KERNEL.load
triton_import_error = _KERNEL.import_error


def vertical_slash_scores_triton(q_last, k, scale, block_size, n_blocks, columns=False):
    """The Triton kernel; see :mod:`patchattn.strategies.vs_estimate.kernel`. Raises ImportError without Triton."""
    return _KERNEL.require().vertical_slash_scores_triton(q_last, k, scale, block_size, n_blocks, columns)


def vertical_slash_scores(q_last, k, scale: float, block_size: int, n_blocks: int, columns: bool = False):
    """The vertical-slash estimate (see :mod:`.naive`): the Triton kernel for fp16/bf16 CUDA tensors (two passes over
    the keys, no (L x N) matrix), the float32 PyTorch reference otherwise (so float32 calibration keeps full
    precision) and for head dims or block sizes the kernel does not take (e.g. Phi-3's 96). ``columns=True`` adds a
    third tensor, the (B, H, N) score of every key position."""
    mod = load_triton_kernel() if q_last.is_cuda and q_last.dtype in (torch.float16, torch.bfloat16) else None
    if mod is not None and mod.unsupported_reason(q_last, k, block_size) is None:
        return mod.vertical_slash_scores_triton(q_last, k, scale, block_size, n_blocks, columns)
    return vertical_slash_scores_naive(q_last, k, scale, block_size, n_blocks, columns)


__all__ = [
    "load_triton_kernel", "triton_import_error", "vertical_slash_scores", "vertical_slash_scores_naive", "vertical_slash_scores_triton",
]
