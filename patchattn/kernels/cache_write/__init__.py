"""One decode token into a layer's head-budgeted pools: the PyTorch reference (always) and the Triton kernel (when
Triton imports, on first use), one launch for what the reference does in about a dozen."""

from __future__ import annotations

from ...lazy import LazyKernel
from .naive import write_token_naive

_KERNEL = LazyKernel(__name__ + ".kernel")
load_triton_kernel = _KERNEL.load
triton_import_error = _KERNEL.import_error


def write_token_triton(*args, **kwargs):
    """The Triton kernel; see :mod:`patchattn.kernels.cache_write.kernel`. Raises ImportError without Triton."""
    return _KERNEL.require().write_token_triton(*args, **kwargs)


__all__ = ["load_triton_kernel", "triton_import_error", "write_token_naive", "write_token_triton"]
