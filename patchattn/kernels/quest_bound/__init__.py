"""Quest's page bounds for a decode query: the PyTorch reference (:func:`quest_bounds_naive`, always) and the Triton
kernel (when Triton imports, on first use), which reads each candidate page's extremes once; :func:`quest_bounds`
picks the kernel on CUDA unless ``PATCHATTN_FUSED_QUEST=0`` (a graphed 8B-shaped step with Quest heads at 128K: 15.5 ms
against 25.2 with the reference, H100, benchmarks/RESULTS.md)."""

from __future__ import annotations

import os

from ...lazy import LazyKernel
from .naive import page_bounds, quest_bounds_naive

_KERNEL = LazyKernel(__name__ + ".kernel")
load_triton_kernel = _KERNEL.load
triton_import_error = _KERNEL.import_error


def quest_bounds_triton(*args, **kwargs):
    """The Triton kernel; see :mod:`patchattn.kernels.quest_bound.kernel`. Raises ImportError without Triton."""
    return _KERNEL.require().quest_bounds_triton(*args, **kwargs)


FUSED_QUEST_ENV = "PATCHATTN_FUSED_QUEST"


def quest_bounds(query, page_min, page_max, candidates):
    """The Triton kernel on CUDA where it takes the input, the reference on a CPU or under ``PATCHATTN_FUSED_QUEST=0``
    (the choice reads the environment and shapes only: a traced or captured decode step keeps it)."""
    if query.is_cuda and os.environ.get(FUSED_QUEST_ENV) != "0":
        mod = load_triton_kernel()
        if mod is not None and mod.unsupported_reason(query, page_min) is None:
            return mod.quest_bounds_triton(query, page_min, page_max, candidates)
    return quest_bounds_naive(query, page_min, page_max, candidates)


__all__ = ["load_triton_kernel", "page_bounds", "quest_bounds", "quest_bounds_naive", "quest_bounds_triton", "triton_import_error"]
