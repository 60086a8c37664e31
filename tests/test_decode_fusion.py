"""The norms and MLPs of a replayed decode step run compiled (:mod:`patchattn.decode_fusion`), only there.

On a CPU the compile backend is "eager" (Dynamo traces, nothing is generated) and the graph is simulated: what is
tested is which calls take the compiled path and when. On a GPU, inductor inside the real CUDA graph is covered by
``test_decode_graphs.py``'s 256 greedy tokens against eager generate."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import patchattn
from patchattn import decode_fusion, decode_graphs, hf
from patchattn.cache import HeadBudgetCache
from test_decode_graphs import batch, compile_everywhere, kv_recipe

pytestmark = pytest.mark.internals  # generate's compile path, as in test_decode_graphs


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fusible_modules_are_the_norms_and_mlps_outermost(arch):
    model = tiny_model(arch)
    found = decode_fusion.fusible_modules(model)
    names = {type(m).__name__ for m in found}
    n_layers = model.config.num_hidden_layers
    assert all(n.endswith(("RMSNorm", "MLP")) for n in names)
    assert sum(type(m).__name__.endswith("MLP") for m in found) == n_layers
    assert sum(type(m).__name__.endswith("RMSNorm") for m in found) >= 2 * n_layers + 1  # two a layer and the final one


def test_a_module_with_hooks_or_compiled_already_is_left_alone():
    model = tiny_model("llama")
    layer = model.model.layers[0]
    layer.mlp.register_forward_hook(lambda *a: None)
    layer.input_layernorm.compile(backend="eager")
    found = decode_fusion.fusible_modules(model)
    assert layer.mlp not in found and layer.input_layernorm not in found
    assert model.model.layers[1].mlp in found


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generate_compiles_the_decode_steps_modules_only_and_matches_eager(arch, monkeypatch):
    """generate's compile path with fusion on (backend "eager" on a CPU): the decode steps call the norms and MLPs
    compiled, the prefill and the eager generation never do, the tokens are eager generate's, and unpatching gives
    every module its own call back."""
    monkeypatch.setenv(decode_fusion.ENV, "1")
    model = tiny_model(arch)
    ids, mask = batch()
    with patchattn.patched(model, kv_recipe(model), backend="torch"):
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        runner = decode_graphs.runner_for(model)
        runner.graph_factory = decode_graphs.SimulatedGraph
        runner.fuse_backend = "eager"
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache_implementation="static",
                             compile_config=compile_everywhere())
        fusion = runner.fusion
        modules = list(fusion.modules)
        per_step = len(modules)
        # the eager first step and the capture call every module compiled; a replay runs no Python
        assert fusion.calls == {"compiled": 2 * per_step, "eager": 0}
        assert runner.paths == {"eager": 1, "graph": 10}
        assert not fusion.active
        model(ids[:, :5])  # outside a decode step: the modules' own calls
        assert fusion.calls["compiled"] == 2 * per_step
    assert torch.equal(out, eager)
    assert all(m._compiled_call_impl is None for m in modules)


def test_a_capture_never_compiles_an_input_it_has_not_met():
    """Inside a capture a module meets a shape no eager step compiled: it runs eagerly there (compiling inside a
    capture would run the compiler's own kernels into the graph), and compiled after an eager step met it."""
    model = tiny_model("llama")
    fusion = decode_fusion.ModuleFusion(model, backend="eager")
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(2, 1, model.config.hidden_size)
    with torch.no_grad():
        with fusion.decoding(capture=True):
            first = norm(x)
        with fusion.decoding():
            second = norm(x)
        with fusion.decoding(capture=True):
            third = norm(x)
    assert fusion.calls == {"eager": 1, "compiled": 2}
    assert torch.allclose(first, second) and torch.allclose(second, third)
    fusion.remove()
    assert norm._compiled_call_impl is None


def test_the_default_is_the_exact_kernels_on_cuda_only(monkeypatch):
    """Unset: CUDA decode steps fuse with the eager-exact kernels (measured token-exact on an H100); a CPU's do not.
    Set: wherever it is not off, "1" meaning inductor."""
    monkeypatch.delenv(decode_fusion.ENV, raising=False)
    assert decode_fusion.enabled_by_env("cuda") and not decode_fusion.enabled_by_env("cpu")
    assert decode_fusion.backend_from_env() == decode_fusion.EXACT and decode_fusion.setting() == "exact (default)"
    monkeypatch.setenv(decode_fusion.ENV, "1")
    assert decode_fusion.enabled_by_env("cpu") and decode_fusion.backend_from_env() == "inductor"
    monkeypatch.setenv(decode_fusion.ENV, "off")
    assert not decode_fusion.enabled_by_env("cuda")


@pytest.mark.parametrize("setting", [None, "0"])
def test_fusion_is_off_on_a_cpu_by_default_and_under_the_env_switch(setting, monkeypatch):
    """A CPU's replayed step builds no fusion unless PATCHATTN_DECODE_FUSE asks, and none under "0"."""
    if setting is None:
        monkeypatch.delenv(decode_fusion.ENV, raising=False)
    else:
        monkeypatch.setenv(decode_fusion.ENV, setting)
    model = tiny_model("llama")
    ids, _ = batch(n=100, rows=1)
    recipe = kv_recipe(model)
    with torch.no_grad(), patchattn.patched(model, recipe, backend="torch"):
        runner = decode_graphs.runner_for(model)
        runner.graph_factory = decode_graphs.SimulatedGraph
        runner.fuse_backend = "eager"
        cache = HeadBudgetCache.from_recipe(recipe, model.config)
        out = model(ids, use_cache=True, **{hf.cache_argument(model): cache})
        token = out.logits[:, -1:].argmax(-1)
        for i in range(3):
            pos = torch.full((1, 1), 100 + i)
            token = runner(input_ids=token, position_ids=pos, use_cache=True, **{hf.cache_argument(model): cache}).logits.argmax(-1)
    assert runner.fusion is None and runner.paths == {"eager": 1, "graph": 2}


def test_the_experts_of_a_mixture_are_left_alone():
    """An expert's MLP meets however many tokens the router sends it: a new shape at every step, never fused."""

    class SparseMoeBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([type("ExpertMLP", (torch.nn.Linear,), {})(4, 4) for _ in range(2)])

    model = torch.nn.Module()
    model.moe = SparseMoeBlock()
    model.mlp = type("DenseMLP", (torch.nn.Linear,), {})(4, 4)
    assert decode_fusion.fusible_modules(model) == [model.mlp]


def test_a_compiler_that_fails_leaves_every_module_eager_and_says_so(caplog):
    """A backend that raises: said once in the log, the call answered eagerly, and no compiled call tried again."""
    import logging

    def broken(graph_module, example_inputs):
        raise RuntimeError("no compiler here")

    model = tiny_model("llama")
    fusion = decode_fusion.ModuleFusion(model, backend=broken)
    norm, mlp = model.model.layers[0].input_layernorm, model.model.layers[0].mlp
    x = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        expected = mlp._call_impl(norm._call_impl(x))
        with caplog.at_level(logging.WARNING, logger="patchattn"), fusion.decoding():
            got = mlp(norm(x))
    assert torch.equal(got, expected)
    assert fusion.failed and "no compiler here" in fusion.failed
    assert fusion.calls == {"compiled": 0, "eager": 2}
    assert caplog.text.count("run their norms and MLPs eagerly") == 1


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_exact_forwards_equal_the_modules_own(arch):
    """exact_forward's split norm (float32 squares, PyTorch's own mean, the tail) and gated SiLU give each module's own
    output bit for bit (here through the references; the kernels are held to them in test_kernel_exact_fusion)."""
    from patchattn.exact_modules import exact_forward

    model = tiny_model(arch).to(torch.bfloat16)
    x = torch.randn(3, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    checked = 0
    for module in decode_fusion.fusible_modules(model):
        run = exact_forward(module)
        if run is None:  # Gemma's MLP (gelu-tanh) has no exact forward
            assert type(module).__name__.endswith("MLP") and arch == "gemma3"
            continue
        width = module.weight.shape[-1] if hasattr(module, "weight") else x.shape[-1]  # Gemma's q/k norms: head dim
        inp = x[..., :width]
        with torch.no_grad():
            assert torch.equal(run(inp), module(inp)), type(module).__name__
        checked += 1
    assert checked >= 2 * model.config.num_hidden_layers + 1


def test_the_exact_backend_admits_only_what_equals_eager_and_generate_matches(monkeypatch, caplog):
    """PATCHATTN_DECODE_FUSE=exact: each module's fused forward is checked against its own output on the first decode
    step and used only where equal; one whose fused forward differs (a norm that is not what its attributes suggest)
    stays eager, said once; the tokens are eager generate's."""
    import logging

    class OddRMSNorm(torch.nn.Module):  # a norm with Llama's attributes and another formula
        def __init__(self, hidden):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return self.weight * (x / (x.abs().mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setenv(decode_fusion.ENV, "exact")
    model = tiny_model("llama")
    model.model.norm = OddRMSNorm(model.config.hidden_size)
    ids, mask = batch()
    with patchattn.patched(model, kv_recipe(model), backend="torch"):
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        runner = decode_graphs.runner_for(model)
        runner.graph_factory = decode_graphs.SimulatedGraph
        runner.fuse_backend = "inductor"  # the env's "exact" wins over the runner's default
        with caplog.at_level(logging.INFO, logger="patchattn"):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cache_implementation="static",
                                 compile_config=compile_everywhere())
        fusion = runner.fusion
        assert fusion.backend == decode_fusion.EXACT
        verdicts = {key[0].__name__: ok for key, ok in fusion.admitted.items()}
        assert verdicts == {"LlamaRMSNorm": True, "LlamaMLP": True, "OddRMSNorm": False}
        n = len(fusion.modules)
        # the first step: each kind of module eager once (and checked), the rest fused once admitted; the capture: all
        # but the odd norm fused
        assert fusion.calls == {"eager": len(verdicts) + 1, "compiled": 2 * n - len(verdicts) - 1}
    assert torch.equal(out, eager)
    assert caplog.text.count("run OddRMSNorm eagerly") == 1
