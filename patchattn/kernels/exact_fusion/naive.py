"""The PyTorch references of :mod:`.kernel`: each is the arithmetic of an eager module's forward, op for op.

An RMSNorm is split where its one reduction is: :func:`squares_naive` (the float32 squares whose mean is the variance;
the mean itself stays PyTorch's own reduction, so it sums in the same order as the eager module), then
:func:`rms_tail_naive` (everything after the mean). ``plus_one`` picks the two families transformers has: Llama's
(``weight * (x * rsqrt(var + eps)).to(dtype)``) and Gemma's (``((x * rsqrt(var + eps)) * (1 + weight.float())).to(dtype)``).
:func:`silu_mul_naive` is a gated MLP's ``silu(gate) * up`` in the input dtype.
"""

from __future__ import annotations

import torch


def squares_naive(x: torch.Tensor) -> torch.Tensor:
    """``x.float().pow(2)``."""
    return x.float().pow(2)


def rms_tail_naive(x: torch.Tensor, variance: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool) -> torch.Tensor:
    """An RMSNorm after its mean: ``variance`` (..., 1) float32."""
    normed = x.float() * torch.rsqrt(variance + eps)
    if plus_one:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def silu_mul_naive(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up
