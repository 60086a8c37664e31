"""Triton launches a kernel on the current CUDA device and its stream, whatever device the tensors are on. A model
that accelerate spread over several GPUs runs layers on ``cuda:1`` while ``cuda:0`` is current: launched there, the
kernel reads another GPU's memory (an illegal address). Every launch site (in ``kernels/`` and
``strategies/vs_estimate/``) enters the tensors' device first."""

from __future__ import annotations

import contextlib
import functools

import torch


def on_device_of(tensor: torch.Tensor):
    """A context that makes ``tensor``'s CUDA device current (nothing to do for CPU tensors or the current device)."""
    if tensor.is_cuda and tensor.device.index is not None and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def launches_on_input_device(fn):
    """Decorator for a kernel's Python entry point: its first argument's device is current for the whole call."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with on_device_of(first):
            return fn(first, *args, **kwargs)

    return wrapper
