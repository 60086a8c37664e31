"""Finishing a layout for the kernels in one pass (causal clip, diagonal and last row forced in, compaction to
counts + ids): the PyTorch reference (always) and the Triton kernel (when Triton imports, on first use)."""

from __future__ import annotations

from ...lazy import LazyKernel
from .naive import finalize_ragged_naive

_KERNEL = LazyKernel(__name__ + ".kernel")
load_triton_kernel = _KERNEL.load
triton_import_error = _KERNEL.import_error


def finalize_ragged_triton(keep, dense_rows: int = 0, sync: bool = True, window_rows: int = 0):
    """The Triton kernel; see :mod:`patchattn.kernels.ragged.kernel`. Raises ImportError without Triton."""
    return _KERNEL.require().finalize_ragged_triton(keep, dense_rows=dense_rows, sync=sync, window_rows=window_rows)


__all__ = ["finalize_ragged_naive", "finalize_ragged_triton", "load_triton_kernel", "triton_import_error"]
