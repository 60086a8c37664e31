"""The small modules of a decode step (norms, MLPs) compiled by ``torch.compile``, inside the replayed graph.

A replayed decode step of an 8B-shaped model still launches some forty kernels a layer, and most of them are tiny:
an RMSNorm is seven elementwise and reduction launches in eager PyTorch, a gated MLP's activation two more. In a CUDA
graph each still costs a few microseconds, about 0.1 ms a layer in all (H100, ``benchmarks/RESULTS.md``). Compiled
(inductor), each norm is one kernel and the activation is fused into one.

:class:`ModuleFusion` compiles each such module class's ``forward`` once per input shape and routes a module's call
to it only while :class:`~patchattn.decode_graphs.DecodeGraphs` runs a decode step (:meth:`ModuleFusion.decoding`):
a prefill, a training step or any call outside a decode step runs the module as before. The attention and the cache
are never traced. A cache's first decode step runs eagerly and compiles what it meets; a capture takes the compiled
code only for inputs already compiled, so no compilation runs inside a capture (a module meeting a new shape there
runs eagerly, and compiles on the next eager step). Modules with hooks of their own (accelerate's offloading, a
user's) are left alone.

``PATCHATTN_DECODE_FUSE=exact``, the default on CUDA, fuses without changing a bit: each norm and gated MLP runs
:mod:`patchattn.exact_modules`' kernels, which keep eager's own reduction for the norm's mean and do the rest in eager's
order of operations and roundings (three launches a norm instead of seven or eight, one for ``silu(gate) * up``
instead of two). The first eager decode step with an input shape runs each kind of module both ways and admits the
fused one only where the outputs are equal bit for bit (said once where not); a module of another shape (Gemma's
gelu MLP) stays eager. On an H100 (2026-12-07, ``benchmarks/RESULTS.md``) it takes an 8B-shaped step at 128K from
8.5-9.2 ms to 8.0-8.7 (1.38-1.51x its bandwidth floor, median 1.41x), with SmolLM2's 256 greedy tokens equal to eager
generate's. Other devices fuse only when the variable asks.

``PATCHATTN_DECODE_FUSE=1`` compiles the modules by inductor instead: a little faster (1.35x the floor at 128K), but
not token-exact: inductor's norms reduce in another order and its activations round elsewhere than eager PyTorch's,
and SmolLM2's greedy tokens then leave eager generate's at the 36th. ``0`` runs every module eagerly.
``benchmarks/decode.py --modules-compiled --modules-exact`` times the graph each way. A compilation or kernel that
fails is said once in the log and every module runs eagerly from then on.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from .exact_modules import exact_forward

logger = logging.getLogger(__name__)

ENV = "PATCHATTN_DECODE_FUSE"  # "exact" (default on CUDA): eager-exact kernels; "1": compiled by inductor; "0": every module eager
FUSED_SUFFIXES = ("RMSNorm", "MLP")  # module classes fused, by the end of their name (LlamaRMSNorm, Gemma3MLP, ...)
ROUTED = ("moe", "expert")  # modules (by class name) whose insides are left alone: their inputs change shape
EXACT = "exact"  # the backend of eager-exact kernels (exact_modules) instead of torch.compile
INDUCTOR_OPTIONS = {"emulate_precision_casts": True}  # round where eager rounds its bf16 casts (not enough: see above)
DEFAULT = EXACT  # unset: the eager-exact kernels, on CUDA only (module docstring)
OFF = ("0", "false", "no", "off")


def setting() -> str:
    """What the variable says, or what its absence means (``exact (default)``), for the log."""
    value = os.environ.get(ENV)
    return f"{DEFAULT} (default)" if value is None else value


def enabled_by_env(device_type: str = "cuda") -> bool:
    """Whether decode steps on ``device_type`` fuse: unset, on CUDA only; set, wherever it is not one of :data:`OFF`."""
    value = os.environ.get(ENV)
    if value is None:
        return device_type == "cuda"
    return value.strip().lower() not in OFF


def backend_from_env(default: str = "inductor") -> str:
    """``PATCHATTN_DECODE_FUSE=exact``: the eager-exact kernels; any other setting that turns fusion on: ``default``."""
    return EXACT if os.environ.get(ENV, DEFAULT).strip().lower() == EXACT else default


def fusible_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a decode step's fusion compiles: norms and MLPs (by class name), outermost only, without hooks of
    their own, not compiled already and not inside a mixture of experts."""
    found, inside = [], set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        cls = type(module).__name__
        if any(word in cls.lower() for word in ROUTED):  # experts meet a new number of tokens at every step
            inside.add(name + ".")
        elif cls.endswith(FUSED_SUFFIXES):
            inside.add(name + ".")
            if not _has_hooks(module) and getattr(module, "_compiled_call_impl", None) is None:
                found.append(module)
    return found


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_forward_hooks_with_kwargs", None)
                or hasattr(module, "_hf_hook"))


class ModuleFusion:
    """Fused decode-step versions of one model's norms and MLPs (see the module docstring). ``backend``: "exact" (the
    eager-exact kernels, each admitted by a bitwise check) or a ``torch.compile`` backend ("inductor"; tests use
    "eager"). ``calls`` counts the calls each way ran ("compiled": fused)."""

    def __init__(self, model: torch.nn.Module, backend: str = "inductor"):
        self.backend = backend
        self.modules = fusible_modules(model)
        self._exact = {}  # backend "exact": each module's forward in eager's arithmetic (exact_modules)
        if backend == EXACT:
            self._exact = {id(m): exact_forward(m) for m in self.modules}
            self.modules = [m for m in self.modules if self._exact[id(m)] is not None]
        self.admitted: dict[tuple, bool] = {}  # backend "exact": whether the fused forward equalled the module's
        self.active = self.capturing = False
        self.failed: str | None = None  # why compiling failed (every module eager since)
        self.warm: set[tuple] = set()
        self.calls = {"compiled": 0, "eager": 0}
        self._compiled: dict[type, object] = {}
        self._signatures = {id(m): tuple((tuple(p.shape), p.dtype) for p in m.parameters()) for m in self.modules}
        for module in self.modules:
            module._compiled_call_impl = self._dispatcher(module)
        logger.debug("decode steps compile %d modules (%s)", len(self.modules),
                     ", ".join(sorted({type(m).__name__ for m in self.modules})))

    def remove(self) -> None:
        """Give every module back its own call."""
        for module in self.modules:
            if getattr(module._compiled_call_impl, "fusion", None) is self:
                module._compiled_call_impl = None
        self.modules = []

    @contextlib.contextmanager
    def decoding(self, capture: bool = False):
        """Inside: the fused modules run compiled (a capture: only for inputs compiled before)."""
        self.active, self.capturing = True, capture
        try:
            yield self
        finally:
            self.active = self.capturing = False

    def _dispatcher(self, module: torch.nn.Module):
        def call(*args, **kwargs):
            if not self.active or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                return module._call_impl(*args, **kwargs)
            x = args[0]
            key = (type(module), tuple(x.shape), x.dtype, x.device, self._signatures[id(module)])
            if self.backend == EXACT:
                return self._exact_call(module, x, key)
            if self.failed or (self.capturing and key not in self.warm):
                self.calls["eager"] += 1
                return module._call_impl(x)
            try:
                out = self._compiled_forward(type(module))(module, x)
            except Exception as exc:  # a compiler that cannot take this module: eager from now on, said once
                if self.capturing:
                    raise
                self.failed = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                logger.warning("decode steps run their norms and MLPs eagerly: compiling %s failed (%s)", type(module).__name__,
                               self.failed)
                self.calls["eager"] += 1
                return module._call_impl(x)
            self.warm.add(key)
            self.calls["compiled"] += 1
            return out

        call.fusion = self
        return call

    def _exact_call(self, module: torch.nn.Module, x: torch.Tensor, key: tuple) -> torch.Tensor:
        """Backend "exact": the fused forward where it was admitted; the first eager step with an input admits it only
        if the fused output equals the module's own bit for bit (one device read, once per input shape)."""
        verdict = self.admitted.get(key)
        if verdict:
            self.calls["compiled"] += 1
            return self._exact[id(module)](x)
        self.calls["eager"] += 1
        out = module._call_impl(x)
        if verdict is None and not self.capturing:
            verdict = self.admitted[key] = torch.equal(self._exact[id(module)](x), out)
            if not verdict:
                logger.info("decode steps run %s eagerly: its fused forward is not bit-exact on this device", type(module).__name__)
        return out

    def _compiled_forward(self, cls: type):
        compiled = self._compiled.get(cls)
        if compiled is None:
            options = {k: v for k, v in INDUCTOR_OPTIONS.items() if _inductor_has(k)} if self.backend == "inductor" else None
            compiled = self._compiled[cls] = torch.compile(cls.forward, backend=self.backend, dynamic=False, options=options)
        return compiled


def _inductor_has(option: str) -> bool:
    try:
        from torch._inductor import config
    except Exception:  # pragma: no cover - a torch without inductor
        return False
    return hasattr(config, option)
