"""The backends ``patch(..., backend=...)`` accepts, and what each means for the kernels and for quality runs.

"auto": the fastest correct path, the sparse kernels where they take the input and dense attention where they cannot
(a CPU, float32, a padded mask: the PyTorch reference would be slower than dense), said once; "sparse": always the
recipe's layouts, the kernels where they take the input and the PyTorch reference elsewhere (what calibration and
eval's quality tasks run: the recipe's quality on any device); "torch", "triton": that implementation of the layouts.
The default is :data:`patchattn.patch.DEFAULT_BACKEND`.
"""

from __future__ import annotations

from .kernels import BACKENDS

PATCH_BACKENDS = ("auto", "sparse", *(b for b in BACKENDS if b != "auto"))


def kernel_backend(backend: str) -> str:
    """The kernels' own backend (:data:`patchattn.kernels.BACKENDS`) for a patch backend."""
    return "auto" if backend in ("auto", "sparse") else backend


def quality_backend(backend: str) -> str:
    """The backend that measures a recipe's quality for a user's ``backend``: its layouts always run ("auto" becomes
    "sparse"), whatever this device's speed."""
    return "sparse" if backend == "auto" else backend
