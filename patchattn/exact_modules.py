"""A module's decode-step forward in fewer launches and eager PyTorch's arithmetic (:mod:`.kernels.exact_fusion`).

:func:`exact_forward` builds it for the two shapes a decoder layer's small modules take in transformers: an RMSNorm
(Llama's family, ``variance_epsilon``: the weight times the normalised input rounded; Gemma's, ``eps``: the normalised
input times ``1 + weight`` in float32) and a gated MLP with SiLU (``down_proj(silu(gate_proj(x)) * up_proj(x))``).
Anything else gets None. The forward runs the Triton kernels on CUDA and their PyTorch references elsewhere.
Recognising a module by its attributes is a guess: :mod:`.decode_fusion` uses the result only where it equals the
module's own output bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch

from .kernels.exact_fusion import load_triton_kernel, rms_tail_naive, silu_mul_naive, squares_naive


def _kernels(x: torch.Tensor):
    """(squares, rms_tail, silu_mul) for ``x``: the Triton kernels on CUDA (when Triton imports), else the references."""
    mod = load_triton_kernel() if x.is_cuda else None
    if mod is None:
        return squares_naive, rms_tail_naive, silu_mul_naive
    return mod.squares_triton, mod.rms_tail_triton, mod.silu_mul_triton


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def exact_forward(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The module's forward of one tensor in the kernels' launches, or None for a module of another shape."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if name.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        if hasattr(module, "variance_epsilon"):
            eps, plus_one = module.variance_epsilon, False
        elif hasattr(module, "eps"):
            eps, plus_one = module.eps, True
        else:
            return None

        def norm(x: torch.Tensor) -> torch.Tensor:
            squares, tail, _ = _kernels(x)
            return tail(x, squares(x).mean(-1, keepdim=True), module.weight, float(eps), plus_one)

        return norm
    if name.endswith("MLP") and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and _is_silu(
            getattr(module, "act_fn", None)):

        def mlp(x: torch.Tensor) -> torch.Tensor:
            return module.down_proj(_kernels(x)[2](module.gate_proj(x), module.up_proj(x)))

        return mlp
    return None
