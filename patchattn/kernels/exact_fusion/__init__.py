"""A decode step's norms and gated activation in fewer launches, in eager PyTorch's own arithmetic: the PyTorch
references (always) and the Triton kernels (when Triton imports, on first use). See
:mod:`patchattn.decode_fusion`, which admits them for a module only where they equal its eager output bit for bit."""

from __future__ import annotations

from ...lazy import LazyKernel
from .naive import rms_tail_naive, silu_mul_naive, squares_naive

_KERNEL = LazyKernel(__name__ + ".kernel")
load_triton_kernel = _KERNEL.load
triton_import_error = _KERNEL.import_error

__all__ = ["load_triton_kernel", "rms_tail_naive", "silu_mul_naive", "squares_naive", "triton_import_error"]
