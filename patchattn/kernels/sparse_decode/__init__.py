"""Page-sparse decode attention: the PyTorch reference (always) and the Triton kernel (when Triton imports).

Triton is optional and imported lazily, on the first call that needs the kernel: importing the package
never imports Triton (so it works without it, and Triton's interpreter can still be switched on with
TRITON_INTERPRET=1 before first use).
"""

from __future__ import annotations

from .naive import sparse_decode_naive

_kernel_module = None
_import_error: str | None = None


def load_triton_kernel():
    """The kernel module (importing Triton on first use), or None when Triton cannot be imported."""
    global _kernel_module, _import_error
    if _kernel_module is None and _import_error is None:
        try:
            from . import kernel as _mod

            _kernel_module = _mod
        except Exception as exc:  # pragma: no cover - depends on the environment
            _import_error = f"{type(exc).__name__}: {exc}"
    return _kernel_module


def triton_import_error() -> str | None:
    """Why Triton could not be imported (None if it could, or if nobody tried yet)."""
    load_triton_kernel()
    return _import_error


def sparse_decode_triton(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale=None, **kwargs):
    """The Triton kernel; see :mod:`patchattn.kernels.sparse_decode.kernel`. Raises ImportError without Triton."""
    mod = load_triton_kernel()
    if mod is None:
        raise ImportError(f"the Triton kernel needs triton: {_import_error}")
    return mod.sparse_decode_triton(q, k_cache, v_cache, page_ids, page_counts, seq_lens, page_size, scale=scale, **kwargs)


__all__ = ["load_triton_kernel", "sparse_decode_naive", "sparse_decode_triton", "triton_import_error"]
