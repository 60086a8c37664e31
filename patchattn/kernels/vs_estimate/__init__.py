"""The vertical-slash estimate (MInference): the PyTorch reference (always) and the Triton kernel (when Triton
imports, on first use)."""

from __future__ import annotations

from .._lazy import LazyKernel
from .naive import vertical_slash_scores_naive

_KERNEL = LazyKernel(__name__ + ".kernel")
load_triton_kernel = _KERNEL.load
triton_import_error = _KERNEL.import_error


def vertical_slash_scores_triton(q_last, k, scale, block_size, n_blocks, columns=False):
    """The Triton kernel; see :mod:`patchattn.kernels.vs_estimate.kernel`. Raises ImportError without Triton."""
    return _KERNEL.require().vertical_slash_scores_triton(q_last, k, scale, block_size, n_blocks, columns)


__all__ = ["load_triton_kernel", "triton_import_error", "vertical_slash_scores_naive", "vertical_slash_scores_triton"]
