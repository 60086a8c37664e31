"""Import a kernel module (and so Triton) on first use, remembering why it failed if it did.

Below both ``kernels/`` and ``strategies/`` (whose vertical-slash estimate has a Triton kernel of its own).

Importing patchattn never imports Triton: the package works without it, and Triton's interpreter can still be
switched on with TRITON_INTERPRET=1 before the first kernel call.
"""

from __future__ import annotations

import importlib


class LazyKernel:
    """The module ``name`` (e.g. ``patchattn.kernels.sparse_prefill.kernel``), imported on first :meth:`load`."""

    def __init__(self, name: str):
        self.name = name
        self.module = None
        self.error: str | None = None

    def load(self):
        """The kernel module, or None when it (Triton) cannot be imported."""
        if self.module is None and self.error is None:
            try:
                self.module = importlib.import_module(self.name)
            except Exception as exc:  # pragma: no cover - depends on the environment
                self.error = f"{type(exc).__name__}: {exc}"
        return self.module

    def import_error(self) -> str | None:
        """Why the module could not be imported (None if it could)."""
        self.load()
        return self.error

    def require(self):
        """The kernel module; ImportError saying why when Triton is missing."""
        module = self.load()
        if module is None:
            raise ImportError(f"the Triton kernel needs triton: {self.error}")
        return module
