"""Block-sparse prefill attention: the PyTorch reference (always) and the Triton kernel (when Triton imports,
on first use: see :mod:`patchattn.lazy`)."""

from __future__ import annotations

from ...lazy import LazyKernel
from .naive import sparse_prefill_naive

_KERNEL = LazyKernel(__name__ + ".kernel")
load_triton_kernel = _KERNEL.load
triton_import_error = _KERNEL.import_error
_HOPPER = LazyKernel(__name__ + ".hopper")
load_hopper_kernel = _HOPPER.load  # the Gluon kernel for Hopper GPUs (None without a Triton that has Gluon)


def sparse_prefill_triton(q, k, v, kv_block_counts, kv_block_ids, block_size, scale=None, **kwargs):
    """The Triton kernel; see :mod:`patchattn.kernels.sparse_prefill.kernel`. Raises ImportError without Triton."""
    return _KERNEL.require().sparse_prefill_triton(q, k, v, kv_block_counts, kv_block_ids, block_size, scale=scale, **kwargs)


__all__ = ["load_hopper_kernel", "load_triton_kernel", "sparse_prefill_naive", "sparse_prefill_triton", "triton_import_error"]
