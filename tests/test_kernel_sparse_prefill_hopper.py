"""The Gluon prefill kernel for Hopper GPUs (patchattn/kernels/sparse_prefill/hopper.py).

Gluon kernels do not run in Triton's interpreter, so on a machine without an sm90 GPU the kernel is compiled for
sm90 (front end, MLIR passes, ptxas: a cubin, nothing launched; tests/hopper_compile.py in a subprocess), which
catches what a change in this Triton's Gluon API breaks. On a Hopper GPU it runs against the PyTorch reference:
fresh random inputs from a fixed seed, the output poisoned with NaN first, the relative error against float32.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton_harness import ON_GPU, gpu, rel_err  # noqa: F401 (first: sets TRITON_INTERPRET)

pytest.importorskip("triton")

from patchattn.kernels import prefill_kernel, sparse_prefill  # noqa: E402
from patchattn.kernels.sparse_prefill.naive import sparse_prefill_naive  # noqa: E402
from patchattn.layout import causal_blocks, column_counts, finalize, num_blocks, to_indices  # noqa: E402

hopper = importlib.import_module("patchattn.kernels.sparse_prefill.hopper")
ON_HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper (sm90) GPU")
needs_gluon = pytest.mark.skipif(not hopper.HAVE_GLUON, reason="this Triton has no Gluon")
ROOT = Path(__file__).resolve().parents[1]


def layout(kind: str, batch: int, heads: int, n: int, n_k: int, gen: torch.Generator) -> torch.Tensor:
    """A finished (causal in positions, diagonal kept) layout with 128-token blocks; queries end where keys end."""
    nb, nkb = num_blocks(n, 128), num_blocks(n_k, 128)
    last_pos = (torch.arange(nb) * 128 + 127).clamp(max=n - 1) + (n_k - n)
    reach = torch.arange(nkb)[None, :] * 128 <= last_pos[:, None]
    if kind == "dense":
        keep = reach.expand(batch, heads, nb, nkb)
    elif kind == "random":
        keep = (torch.rand(batch, heads, nb, nkb, generator=gen) < 0.3) & reach
    elif kind == "streaming":  # sink block + 3 blocks of window
        q_blk = (last_pos // 128)[:, None]
        keep = ((torch.arange(nkb)[None, :] == 0) | (q_blk - torch.arange(nkb)[None, :] <= 3)) & reach
        keep = keep.expand(batch, heads, nb, nkb)
    else:
        raise ValueError(kind)
    keep = keep.clone()
    keep[:, :, torch.arange(nb), last_pos // 128] = True  # the block holding the row's last query
    keep[..., 0] = True
    return keep.contiguous()


def check(batch, hq, hkv, n, d, kind, dtype, seed, n_k=None, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k
    q = torch.randn(batch, hq, n, d, generator=gen).to("cuda", dtype)
    k = torch.randn(batch, hkv, n_k, d, generator=gen).to("cuda", dtype)
    v = torch.randn(batch, hkv, n_k, d, generator=gen).to("cuda", dtype)
    keep = layout(kind, batch, hq, n, n_k, gen).cuda()
    counts, ids = to_indices(keep)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    hopper.sparse_prefill_hopper(q, k, v, counts, ids, 128, out=out, **kwargs)
    ref = sparse_prefill_naive(q.float(), k.float(), v.float(), counts, ids, 128)
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = rel_err(out, ref)
    print(f"\n  hopper B={batch} Hq={hq} Hkv={hkv} N={n} Nk={n_k} d={d} {kind} {dtype} {kwargs}: rel err {err:.2e}")
    assert err < 1e-2, f"relative error {err:.3e}"


# ---------------------------------------------------------------------------------------- any machine
@needs_gluon
@pytest.mark.parametrize("head_dim,stages,pingpong", [(128, 3, True), (64, 2, False)])
def test_compiles_for_sm90(head_dim, stages, pingpong):
    """The kernel compiles for sm90 with this Triton: warp-specialised (a small producer, larger consumers),
    asynchronous wgmma with a wait that leaves one in flight, TMA loads, and shared memory within an H100's 227 KB."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "hopper_compile.py"), str(head_dim), str(stages), str(int(pingpong))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"\n  sm90 d={head_dim} stages={stages} pingpong={pingpong}: {info}")
    assert info["cubin_bytes"] > 0 and info["wgmma"] > 0 and info["wgmma_waits_1"] > 0 and info["tma_loads"] >= 2
    assert str(hopper.PRODUCER_REGS) in info["setmaxnreg"] and str(hopper.CONSUMER_REGS) in info["setmaxnreg"]
    ring = stages * 2 * 128 * head_dim * 2 + 128 * head_dim * 2  # K and V slots plus Q, bf16
    assert ring <= info["shared_bytes"] <= 227 * 1024


def test_unsupported_inputs_named():
    q = torch.zeros(1, 4, 256, 128, dtype=torch.bfloat16)
    reason = hopper.unsupported_reason(q, q[:, :1], q[:, :1], 128)
    assert reason is not None  # a CPU tensor (or no Gluon)
    assert prefill_kernel(q, q[:, :1], q[:, :1], 128) == "torch"


# ----------------------------------------------------------------------------------------- Hopper GPU
@gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch,hq,hkv,n,d,kind,n_k",
    [
        (1, 32, 8, 4100, 128, "dense", None),
        (2, 8, 2, 3001, 128, "random", None),
        (1, 16, 4, 5000, 128, "streaming", None),
        (2, 8, 8, 1000, 64, "random", None),
        (1, 4, 1, 129, 128, "dense", None),
        (1, 8, 2, 384, 128, "dense", 1000),  # queries at the end of longer keys (chunked prefill)
        (2, 4, 4, 700, 64, "random", 1500),
    ],
)
def test_matches_reference_gpu(batch, hq, hkv, n, d, kind, n_k, dtype):
    check(batch, hq, hkv, n, d, kind, dtype, seed=n + d, n_k=n_k)


@gpu
@needs_hopper
@pytest.mark.parametrize("stages,pingpong", [(2, True), (2, False), (3, False)])
def test_schedules_match_reference_gpu(stages, pingpong):
    check(1, 8, 2, 2100, 128, "random", torch.bfloat16, seed=7, stages=stages, pingpong=pingpong)


@gpu
@needs_hopper
def test_dispatch_gpu(monkeypatch):
    """sparse_prefill runs the Gluon kernel on Hopper for block size 128 and head dim 128 without token columns, the
    Triton kernel otherwise (block size 64, head dim 64, columns, or PATCHATTN_GLUON=0), and all of them give the
    reference."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 8, 1000, 128, generator=gen).cuda().bfloat16()
    k = torch.randn(1, 2, 1000, 128, generator=gen).cuda().bfloat16()
    keep = layout("random", 1, 8, 1000, 1000, gen).cuda()
    counts, ids = to_indices(keep)
    assert prefill_kernel(q, k, k, 128) == "gluon-hopper"
    assert prefill_kernel(q[..., :64], k[..., :64], k[..., :64], 128) == "triton"  # d=64: correct here, untimed, not dispatched
    out = sparse_prefill(q, k, k, counts, ids, 128)
    assert torch.equal(out, hopper.sparse_prefill_hopper(q, k, k, counts, ids, 128))
    ref = sparse_prefill_naive(q.float(), k.float(), k.float(), counts, ids, 128)
    assert rel_err(out, ref) < 1e-2
    cols = torch.tensor([[[5, 300, 700]]], dtype=torch.int32).expand(1, 8, 3).contiguous().cuda()
    assert prefill_kernel(q, k, k, 128, columns=cols) == "triton"
    with_cols = sparse_prefill(q, k, k, counts, ids, 128, columns=(cols, column_counts(cols, counts.shape[-1], 128), keep))
    assert rel_err(with_cols, out) > 0  # the columns reach the Triton kernel
    keep64 = finalize(causal_blocks(num_blocks(1000, 64)).expand(1, 8, -1, -1).contiguous()).cuda()
    assert prefill_kernel(q, k, k, 64) == "triton"
    c64, i64 = to_indices(keep64)
    assert rel_err(sparse_prefill(q, k, k, c64, i64, 64), sparse_prefill_naive(q.float(), k.float(), k.float(), c64, i64, 64)) < 1e-2
    monkeypatch.setenv("PATCHATTN_GLUON", "0")
    assert prefill_kernel(q, k, k, 128) == "triton"
    assert rel_err(sparse_prefill(q, k, k, counts, ids, 128), ref) < 1e-2


@gpu
@needs_hopper
def test_noncontiguous_inputs_gpu():
    """q, k, v as a model hands them over (heads transposed out of (B, N, H, D)): same result as contiguous."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1000, 8, 128, generator=gen).cuda().bfloat16().transpose(1, 2)
    k = torch.randn(1, 1000, 2, 128, generator=gen).cuda().bfloat16().transpose(1, 2)
    v = torch.randn(1, 1000, 2, 128, generator=gen).cuda().bfloat16().transpose(1, 2)
    keep = layout("streaming", 1, 8, 1000, 1000, gen).cuda()
    counts, ids = to_indices(keep)
    out = hopper.sparse_prefill_hopper(q, k, v, counts, ids, 128)
    assert torch.equal(out, hopper.sparse_prefill_hopper(q.contiguous(), k.contiguous(), v.contiguous(), counts, ids, 128))
    assert rel_err(out, sparse_prefill_naive(q.float(), k.float(), v.float(), counts, ids, 128)) < 1e-2


@gpu
@needs_hopper
def test_patched_model_gpu(monkeypatch):
    """A tiny Llama with head dim 128 patched at block size 128 (streaming, block top-k and vertical-slash heads):
    the Gluon kernel runs in the model (eager and replayed as CUDA graphs) and gives the PyTorch reference's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import patchattn
    import patchattn.kernels as kernels
    from patchattn.recipe import HeadPlan, Recipe

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).eval().to("cuda", torch.bfloat16)
    recipe = Recipe.uniform(config, "dense", block_size=128)
    plans = [HeadPlan("streaming", {"sink_tokens": 128, "window_tokens": 256}, density=0.3),
             HeadPlan("block_topk", {"threshold": 0.8}, density=0.3),
             HeadPlan("vertical_slash", {"vertical_tokens": 128, "slash_tokens": 256}, density=0.3),
             HeadPlan("dense", {}, density=1.0)]
    recipe.layers = [list(plans) for _ in recipe.layers]
    calls = []
    real = hopper.sparse_prefill_hopper
    monkeypatch.setattr(hopper, "sparse_prefill_hopper", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (1, 1500), generator=gen).cuda() for _ in range(2)]
    with torch.no_grad():
        with patchattn.patched(model, recipe, backend="torch"):
            ref = [model(ids).logits.float() for ids in prompts]
        with patchattn.patched(model, recipe):
            eager = [model(ids).logits.float() for ids in prompts]
        assert len(calls) == 2 * config.num_hidden_layers, "every layer's prefill should run the Gluon kernel"
        with patchattn.patched(model, recipe, cuda_graphs=True):
            graphed = [model(ids).logits.float() for ids in prompts]
        dense = model(prompts[0]).logits.float()
    for r, e, g in zip(ref, eager, graphed):
        torch.testing.assert_close(e, r, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(g, e, atol=2e-2, rtol=2e-2)
    assert (eager[0] - dense).abs().max() > 1e-2, "the recipe should change the output"
    assert kernels.prefill_kernel(torch.zeros(1, 4, 8, 128, device="cuda", dtype=torch.bfloat16),
                                  torch.zeros(1, 2, 8, 128, device="cuda", dtype=torch.bfloat16),
                                  torch.zeros(1, 2, 8, 128, device="cuda", dtype=torch.bfloat16), 128) == "gluon-hopper"
