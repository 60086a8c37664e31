"""Page-sparse decode attention: the PyTorch reference (always), the Triton kernel (when Triton imports,
on first use: see :mod:`patchattn.lazy`) and both behind one custom op for ``torch.compile`` (:mod:`.op`,
which imports no Triton)."""

from __future__ import annotations

from ...lazy import LazyKernel
from .naive import sparse_decode_naive
from .op import op_backend, sparse_decode_op

_KERNEL = LazyKernel(__name__ + ".kernel")
load_triton_kernel = _KERNEL.load
triton_import_error = _KERNEL.import_error


def sparse_decode_triton(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale=None, **kwargs):
    """The Triton kernel; see :mod:`patchattn.kernels.sparse_decode.kernel`. Raises ImportError without Triton."""
    return _KERNEL.require().sparse_decode_triton(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale=scale, **kwargs)


__all__ = ["load_triton_kernel", "op_backend", "sparse_decode_naive", "sparse_decode_op", "sparse_decode_triton", "triton_import_error"]
