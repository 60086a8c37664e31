"""Triton: a decode step's RMSNorm in three launches instead of seven or eight, and ``silu(gate) * up`` in one, each in
eager PyTorch's arithmetic (contract: :mod:`.naive`, same results bit for bit on a GPU where the admission check of
:mod:`patchattn.decode_fusion` finds them equal).

Eager's order of operations and roundings is kept: float32 squares; the mean left to PyTorch (its reduction order);
``rsqrt`` of ``variance + eps``; the product rounded to the input dtype before the weight's product (Llama) or the
weight's ``1 + w`` in float32 (Gemma); SiLU as ``x / (1 + exp(-x))`` with an IEEE division, rounded to the input dtype
before the product with ``up``, which is rounded again; no multiply-add contracted into an FMA (eager contracts none
of these). One program per row (norms) or per block of elements.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - an older Triton
    libdevice = None
# on a GPU the SiLU takes CUDA's own expf and the norm CUDA's own rsqrtf, which eager calls, not Triton's approximate
# instructions; the interpreter has neither
PRECISE_EXP = libdevice is not None and os.environ.get("TRITON_INTERPRET") != "1"

from ...input_device import launches_on_input_device

BLOCK = 1024


@triton.jit
def _squares(X, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n).to(tl.float32)
    tl.store(OUT + offs, x * x, mask=offs < n)


@triton.jit
def _rms_tail(X, VAR, W, OUT, hidden, eps, PLUS_ONE: tl.constexpr, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    var = tl.load(VAR + row)
    if PRECISE:
        r = libdevice.rsqrt(var + eps)
    else:
        r = tl.math.rsqrt(var + eps)
    for start in range(0, hidden, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hidden
        x = tl.load(X + row * hidden + offs, mask=mask).to(tl.float32)
        w = tl.load(W + offs, mask=mask)
        normed = x * r
        if PLUS_ONE:
            out = normed * (1.0 + w.to(tl.float32))
        else:
            out = w.to(tl.float32) * normed.to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + row * hidden + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul(G, U, OUT, n, PRECISE_EXP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask).to(tl.float32)
    u = tl.load(U + offs, mask=mask).to(tl.float32)
    if PRECISE_EXP:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    silu = tl.math.div_rn(g, 1.0 + e).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offs, (silu * u).to(OUT.dtype.element_ty), mask=mask)


@launches_on_input_device
def squares_triton(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _squares[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), BLOCK=BLOCK, enable_fp_fusion=False)
    return out


@launches_on_input_device
def rms_tail_triton(x: torch.Tensor, variance: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool) -> torch.Tensor:
    x = x.contiguous()
    hidden = x.shape[-1]
    out_dtype = x.dtype if plus_one else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rows = x.numel() // hidden
    _rms_tail[(rows,)](x, variance.contiguous(), weight.contiguous(), out, hidden, float(eps), PLUS_ONE=plus_one, PRECISE=PRECISE_EXP,
                       BLOCK=min(BLOCK, triton.next_power_of_2(hidden)), enable_fp_fusion=False)
    return out


@launches_on_input_device
def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _silu_mul[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), PRECISE_EXP=PRECISE_EXP, BLOCK=BLOCK, enable_fp_fusion=False)
    return out
