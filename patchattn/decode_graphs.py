"""A patched model's decode step replayed as one CUDA graph: the whole forward of one token over the budgeted cache.

Run eagerly, a decode step of an 8B-shaped model spends most of its time launching kernels from Python. Over a
:class:`~patchattn.cache.HeadBudgetCache` whose prefill has ended, a step is a fixed sequence of kernels over
buffers that stay put (:mod:`patchattn.cache.pools`), so the model's whole forward for one token per row can be
captured once and replayed, as serving engines do for their decode batches.

:class:`DecodeGraphs` plugs into transformers' own compile path for ``generate``: a patched model's
``_compiled_call``, which ``GenerationMixin.get_compiled_call`` hands ``generate`` for its decode steps when the
generation runs with a compileable cache (``cache_implementation="static"``, the switch a speed-minded user of dense
models already flips, or a ``HeadBudgetCache`` passed in). Each call either replays or runs the forward as
transformers would have (its own ``torch.compile`` of the model for a cache that is not budgeted, eagerly for a
budgeted one it cannot replay), and says why once per reason.

A graph belongs to one cache, whose pools' addresses it holds. A cache's first decode step runs eagerly (the
kernels warm up), the second is captured and replayed, and every later one is replayed. The host's share of a step,
which a replay skips, is done before it: each layer counts the token and takes it off its room
(:meth:`~patchattn.cache.BudgetLayer.advance_host`). A step that would outgrow the reserved room runs eagerly (the
pools grow, elsewhere in memory), and the next step captures again.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import os
import weakref

import torch

from . import decode_fusion, hf
from .cache import HeadBudgetCache

logger = logging.getLogger(__name__)

ENV = "PATCHATTN_DECODE_GRAPHS"  # "0": never replay (every decode step runs as transformers would run it)
RUNNER_ATTR = "_compiled_call"  # what GenerationMixin.get_compiled_call returns while it holds one
SAVED_ATTR = "_patchattn_saved_compiled_call"
# keywords a replay takes: the token, where it sits, the cache, and switches whose answer it gives anyway
REPLAYABLE = {"input_ids", "position_ids", "cache_position", "attention_mask", "use_cache", "return_dict",
              "logits_to_keep", "num_logits_to_keep", "output_attentions", "output_hidden_states", *hf.CACHE_ARGUMENTS}


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class CudaGraph:
    """One captured forward (``torch.cuda.CUDAGraph``): capture records the kernels without running them."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, run, cache):
        with torch.cuda.graph(self.graph):
            return run()

    def replay(self, cache) -> None:
        self.graph.replay()


class SimulatedGraph:
    """A stand-in for :class:`CudaGraph` on any device, for tests of everything around the graph: capture leaves
    the cache's device state as it was (a capture runs no kernel) and keeps its host state (the Python ran); a replay
    moves the device state on and leaves the host's (no Python runs)."""

    def capture(self, run, cache):
        self.run = run
        device_state = [_device_state(layer) for layer in cache.layers]
        out = run()
        for layer, saved in zip(cache.layers, device_state):
            for t, copy in zip(_device_tensors(layer), saved):
                t.copy_(copy)
        self.logits = out.logits
        return out

    def replay(self, cache) -> None:
        host = [(layer.seen, layer.room_tokens) for layer in cache.layers]
        self.logits.copy_(self.run().logits)
        for layer, (seen, room) in zip(cache.layers, host):
            layer.seen, layer.room_tokens = seen, room


def _device_tensors(layer) -> list[torch.Tensor]:
    names = ("keys", "values", "positions", "valid_t", "written_t", "page_min", "page_max")
    return [t for t in (getattr(layer, n, None) for n in names) if t is not None]


def _device_state(layer) -> list[torch.Tensor]:
    return [t.clone() for t in _device_tensors(layer)]


def _pool_ids(cache) -> tuple:
    """What a graph's kernels point at: every layer's pools (reallocated when they grow)."""
    return tuple((id(layer.keys), id(layer.values), id(layer.page_min)) for layer in cache.layers)


class _Step:
    """The graph of one cache's decode step and its fixed input buffers."""

    def __init__(self, cache: HeadBudgetCache, input_ids: torch.Tensor, with_cache_position: bool, graph):
        self.cache = weakref.ref(cache)
        self.pools = _pool_ids(cache)
        self.input_ids = torch.zeros_like(input_ids)
        self.position_ids = torch.zeros_like(input_ids)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=input_ids.device) if with_cache_position else None
        self.graph = graph
        self.logits = self.output_type = self.cache_name = None

    def fits(self, cache, input_ids) -> bool:
        return self.cache() is cache and self.pools == _pool_ids(cache) and self.input_ids.shape == input_ids.shape

    def load(self, input_ids, position_ids, cache_position, cache) -> None:
        """This step's token and positions into the graph's buffers (the positions from the cache's count when the
        call names none: every row's next index)."""
        self.input_ids.copy_(input_ids)
        if position_ids is not None:
            self.position_ids.copy_(position_ids)
        else:
            self.position_ids.fill_(cache.get_seq_length())
        if self.cache_position is not None:
            if cache_position is not None:
                self.cache_position.copy_(cache_position.reshape(-1)[-1:])
            else:
                self.cache_position.fill_(cache.get_seq_length())


class DecodeGraphs:
    """The decode-step runner of one patched model (see the module docstring). Called as the model is
    (``runner(**model_inputs)``); ``paths`` counts the steps each way ran ("graph", "eager", "compiled")."""

    def __init__(self, model, graph_factory=None, fuse_backend: str | None = "inductor"):
        self.model = weakref.ref(model)
        self.graph_factory = graph_factory or CudaGraph
        # the norms and MLPs of a replayed step fused (decode_fusion): eager-exact kernels on CUDA by default
        self.fuse_backend = fuse_backend
        self.fusion: decode_fusion.ModuleFusion | None = None
        self.step: _Step | None = None
        self.paths: collections.Counter = collections.Counter()
        self.said: set[str] = set()
        self._compiled = None
        self._with_cache_position = "cache_position" in inspect.signature(type(model).forward).parameters

    def __call__(self, *args, **kwargs):
        model = self.model()
        _, cache = hf.given_cache(kwargs)
        if not isinstance(cache, HeadBudgetCache):
            return self._as_transformers(model, *args, **kwargs)
        reason = "the call passes positional arguments" if args else self._why_not(cache, kwargs)
        if reason is not None:
            self._say(f"a decode step runs eagerly: {reason}")
            self.paths["eager"] += 1
            return model(*args, **kwargs)
        return self._replay(model, cache, kwargs)

    # ---- the graph -------------------------------------------------------------------------------------
    def _replay(self, model, cache, kwargs):
        input_ids = kwargs["input_ids"]
        step = self.step
        fusion = self._fusion(model, input_ids)
        if step is None or step.cache() is not cache:  # a cache's first step runs eagerly: the kernels warm up
            self.step = _Step(cache, input_ids, self._with_cache_position, None)
            self.paths["eager"] += 1
            with fusion.decoding() if fusion else contextlib.nullcontext():  # and the fused modules compile
                return model(**kwargs)
        if step.graph is not None and step.fits(cache, input_ids):
            step.load(input_ids, kwargs.get("position_ids"), kwargs.get("cache_position"), cache)
            for layer in cache.layers:
                layer.advance_host(1)
        else:  # capture: the forward's Python runs once (the host's share of this step), its kernels are recorded
            self.step = step = _Step(cache, input_ids, self._with_cache_position, self.graph_factory())
            step.load(input_ids, kwargs.get("position_ids"), kwargs.get("cache_position"), cache)
            with fusion.decoding(capture=True) if fusion else contextlib.nullcontext():
                out = step.graph.capture(lambda: model(**self._graph_inputs(model, step, cache)), cache)
            step.logits, step.output_type = out.logits, type(out)
            step.cache_name = next(n for n in hf.CACHE_ARGUMENTS if out.get(n) is cache)
            self._say(f"decode steps replay as one CUDA graph of the whole model (batch {input_ids.shape[0]})")
        step.graph.replay(cache)
        self.paths["graph"] += 1
        return step.output_type(logits=step.logits.clone(), **{step.cache_name: cache})

    def _fusion(self, model, input_ids: torch.Tensor) -> decode_fusion.ModuleFusion | None:
        """The model's decode-step fusion, built on the first replayable step (unset variable or inductor: on CUDA only;
        None: off)."""
        if not (self.fuse_backend and decode_fusion.enabled_by_env(input_ids.device.type)):
            return None
        if self.fusion is None:
            backend = decode_fusion.backend_from_env(self.fuse_backend)
            if input_ids.device.type != "cuda" and backend == "inductor":
                return None
            self.fusion = decode_fusion.ModuleFusion(model, backend)
            how = "in eager's arithmetic, where bit-exact" if backend == decode_fusion.EXACT else "compiled by torch.compile"
            self._say(f"decode steps run {len(self.fusion.modules)} norms and MLPs fused, {how} "
                      f"({decode_fusion.ENV}={decode_fusion.setting()})")
        return self.fusion

    def _graph_inputs(self, model, step: _Step, cache) -> dict:
        inputs = {"input_ids": step.input_ids, "position_ids": step.position_ids, "use_cache": True, "return_dict": True,
                  hf.cache_argument(model): cache}
        if step.cache_position is not None:
            inputs["cache_position"] = step.cache_position
        return inputs

    def _why_not(self, cache: HeadBudgetCache, kwargs: dict) -> str | None:
        """Why this forward cannot be replayed (None: it can)."""
        input_ids = kwargs.get("input_ids")
        layer = cache.layers[0] if cache.layers else None
        if not enabled_by_env():
            return f"{ENV}=0"
        if layer is None or layer.keys is None:
            return "the cache has not been prefilled"
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            return "not one new token per row (input_ids of shape (batch, 1))"
        if input_ids.device.type != "cuda" and self.graph_factory is CudaGraph:
            return "not on a CUDA device"
        if torch.is_grad_enabled():
            return "gradients are on"
        extra = sorted(k for k, v in kwargs.items() if k not in REPLAYABLE and v is not None)
        if extra or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return f"the call asks for {', '.join(extra) or 'attentions or hidden states'}"
        if any(not l.room_for(1) for l in cache.layers):
            return "the cache has no room reserved for another token (it grows, and the next step captures again)"
        return None

    # ---- not a budgeted cache: what transformers would have run ------------------------------------------
    def _as_transformers(self, model, *args, **kwargs):
        """transformers' own ``torch.compile`` of the model (its ``get_compiled_call``, built on first use)."""
        if self._compiled is None:
            config = getattr(model.generation_config, "compile_config", None) or model._default_compile_config()
            self._compiled = torch.compile(model.__call__, **config.to_dict())
        self._say("the decode steps of a generation on a cache that is not budgeted run transformers' torch.compile")
        self.paths["compiled"] += 1
        return self._compiled(*args, **kwargs)

    def _say(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            logger.info(message)


def install(model) -> DecodeGraphs:
    """Make ``model``'s decode steps in ``generate``'s compile path run through a :class:`DecodeGraphs` (idempotent;
    a runner transformers had built is kept aside and put back by :func:`remove`)."""
    runner = runner_for(model)
    if runner is not None:
        return runner
    if RUNNER_ATTR in vars(model):
        setattr(model, SAVED_ATTR, vars(model)[RUNNER_ATTR])
    vars(model).pop("_last_compile_config", None)  # its memo: a stale one would make transformers build its own
    runner = DecodeGraphs(model)
    setattr(model, RUNNER_ATTR, runner)
    return runner


def remove(model) -> None:
    runner = runner_for(model)
    if runner is None:
        return
    if runner.fusion is not None:
        runner.fusion.remove()
    delattr(model, RUNNER_ATTR)
    if SAVED_ATTR in vars(model):
        setattr(model, RUNNER_ATTR, vars(model).pop(SAVED_ATTR))


def runner_for(model) -> DecodeGraphs | None:
    """The model's decode-graph runner, if :func:`install` gave it one (and transformers has not replaced it)."""
    runner = vars(model).get(RUNNER_ATTR)
    return runner if isinstance(runner, DecodeGraphs) else None
