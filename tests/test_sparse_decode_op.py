"""The page-sparse decode custom op (``torch.ops.patchattn.sparse_decode``): same output as the reference, passes
``torch.library.opcheck``, traces into one graph under ``torch.compile(fullgraph=True)``, and runs the Triton kernel
where the kernel takes the input (through Triton's interpreter on a machine without CUDA, as the kernel tests do).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

import pytest
import torch
from triton_harness import DEVICE, ON_GPU, is_interpreted, needs_cuda, rel_err, rerun_interpreted, runs_kernel_mark  # noqa: F401 (first: sets TRITON_INTERPRET)

from patchattn.kernels.sparse_decode import sparse_decode_naive
from patchattn.kernels.sparse_decode.op import OP, op_backend, sparse_decode_op

op_module = importlib.import_module("patchattn.kernels.sparse_decode.op")
try:
    kernel = importlib.import_module("patchattn.kernels.sparse_decode.kernel")
except ImportError:  # no Triton: only the Triton-branch tests skip
    kernel = None
INTERPRETED = kernel is not None and is_interpreted(kernel._sparse_decode_split)
needs_triton = pytest.mark.skipif(kernel is None, reason="triton is not installed")
runs_kernel = runs_kernel_mark(INTERPRETED)
# Triton's interpreter computes bfloat16 wrongly on CPU (numpy has no bfloat16): fp16 there, bf16 on GPU.
SMALL_DTYPE = torch.bfloat16 if ON_GPU else torch.float16
needs_op = pytest.mark.skipif(OP is None, reason="this torch has no torch.library.custom_op")


def make_case(seed, s_max=40, d=16, page_size=8, per_head_lens=False, dtype=torch.float32, device="cpu"):
    """B=2, Hq=4, Hkv=2 (GQA group 2): row 0 of length 37 (a partial last page), row 1 of length 21 whose second
    KV head selects no page. Per-head limits, when asked, cut each head's valid run shorter. Padding slots of the page
    lists hold junk page numbers. Returns (q, k, v, page_ids, page_counts, seq_lens) and the page size."""
    gen = torch.Generator().manual_seed(seed)
    batch, n_q_heads, n_kv_heads = 2, 4, 2
    q = torch.randn(batch, n_q_heads, d, generator=gen).to(device, dtype)
    k = torch.randn(batch, n_kv_heads, s_max, d, generator=gen).to(device, dtype)
    v = torch.randn(batch, n_kv_heads, s_max, d, generator=gen).to(device, dtype)
    max_pages = -(-s_max // page_size)
    ids = torch.randint(1000, 1 << 20, (batch, n_kv_heads, max_pages), generator=gen, dtype=torch.int32)  # junk
    lists = [[[0, 2, 4], [1, 3, 4]], [[0, 2], []]]  # page 4 of row 0 holds tokens 32..36 only
    counts = torch.zeros(batch, n_kv_heads, dtype=torch.int32)
    for b, row in enumerate(lists):
        for h, pages in enumerate(row):
            ids[b, h, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
            counts[b, h] = len(pages)
    lens = torch.tensor([[37, 35], [21, 21]] if per_head_lens else [37, 21], dtype=torch.int32)
    return tuple(t.to(device) for t in (q, k, v, ids, counts, lens)), page_size


@pytest.mark.parametrize("per_head_lens", [False, True], ids=["lens_B", "lens_B_Hkv"])
def test_op_matches_reference(per_head_lens):
    (q, k, v, ids, counts, lens), page = make_case(seed=1, per_head_lens=per_head_lens)
    assert op_backend(q, k, v, page) == "torch"  # float32 on CPU: the reference runs
    out = sparse_decode_op(q, k, v, ids, counts, lens, page)
    assert torch.equal(out, sparse_decode_naive(q, k, v, ids, counts, lens, page))
    assert torch.equal(out[1, 2:], torch.zeros_like(out[1, 2:]))  # the head with no page: zero output
    assert out[0].abs().amin() > 0 and out.is_contiguous()
    scaled = sparse_decode_op(q, k, v, ids, counts, lens, page, scale=0.3)
    assert torch.equal(scaled, sparse_decode_naive(q, k, v, ids, counts, lens, page, scale=0.3)) and not torch.equal(scaled, out)


@needs_op
@pytest.mark.parametrize("per_head_lens", [False, True], ids=["lens_B", "lens_B_Hkv"])
def test_opcheck(per_head_lens):
    (q, k, v, ids, counts, lens), page = make_case(seed=2, per_head_lens=per_head_lens)
    torch.library.opcheck(OP, (q, k, v, ids, counts, lens, page, 0.25))  # schema, fake tensor, autograd registration, AOT


def decode_step(q, k, v, ids, counts, lens):
    """A decode step in miniature: the op, then arithmetic on its output."""
    out = sparse_decode_op(q, k, v, ids, counts, lens, 8)
    return torch.tanh(out) * 2.0 + q.mean(-1, keepdim=True)


@needs_op
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    graphs = []

    def recording(gm, example_inputs):  # the captured graph, then the chosen backend
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(decode_step, fullgraph=True, backend=recording)  # fullgraph: a graph break raises
    for s_max, per_head_lens in [(40, False), (48, True)]:  # a longer cache and per-head limits: same graph code
        inputs, _ = make_case(seed=s_max, s_max=s_max, per_head_lens=per_head_lens)
        torch.testing.assert_close(compiled(*inputs), decode_step(*inputs), rtol=1e-6, atol=1e-6)
    op_nodes = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.patchattn.sparse_decode.default]
    assert graphs and len(op_nodes) == len(graphs)  # each graph calls the op once, as one node


def test_fallback_without_custom_op(monkeypatch, caplog):
    """On a torch without ``torch.library.custom_op`` the module still imports and computes the same output."""
    monkeypatch.delattr(torch.library, "custom_op")
    spec = importlib.util.spec_from_file_location("patchattn.kernels.sparse_decode._op_without_custom_op", op_module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    with caplog.at_level(logging.DEBUG, logger=spec.name):
        spec.loader.exec_module(fresh)
    assert fresh.OP is None and "custom_op" in caplog.text
    (q, k, v, ids, counts, lens), page = make_case(seed=3, per_head_lens=True)
    assert torch.equal(fresh.sparse_decode_op(q, k, v, ids, counts, lens, page), sparse_decode_naive(q, k, v, ids, counts, lens, page))


# ------------------------------------------------------------------------ the Triton branch (tiny shapes)
@needs_triton
@runs_kernel
@pytest.mark.parametrize("per_head_lens", [False, True], ids=["lens_B", "lens_B_Hkv"])
def test_op_triton_branch(per_head_lens):
    (q, k, v, ids, counts, lens), page = make_case(
        seed=4, s_max=64, d=64, page_size=16, per_head_lens=per_head_lens, dtype=SMALL_DTYPE, device=DEVICE
    )
    assert op_backend(q, k, v, page) == "triton"
    ref = sparse_decode_naive(q.float(), k.float(), v.float(), ids, counts, lens, page)
    for _ in range(2):  # the first call checks the inputs and remembers the choice, the second skips the checks
        out = sparse_decode_op(q, k, v, ids, counts, lens, page)
        assert out.dtype == q.dtype and torch.isfinite(out).all() and rel_err(out, ref) < 1e-2
        assert torch.equal(out[1, 2:], torch.zeros_like(out[1, 2:]))


@needs_triton
@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the Triton-branch test runs in this process")
def test_op_triton_branch_in_interpreter_subprocess():
    """Triton was imported before the interpreter could be switched on: run the Triton-branch test anew."""
    rerun_interpreted(__file__, "test_op_triton_branch and not subprocess", timeout_s=600)


@needs_cuda
@needs_op
def test_op_compiles_and_graph_captures_on_gpu():
    """The CUDA case the op exists for: compiled with fullgraph, and captured in a CUDA graph that replays with new
    page lists written into the same buffers."""
    (q, k, v, ids, counts, lens), page = make_case(seed=5, s_max=256, d=128, page_size=16, dtype=torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    step = lambda *args: sparse_decode_op(*args, page) * 2.0  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, ids, counts, lens), step(q, k, v, ids, counts, lens), rtol=0, atol=0)

    sparse_decode_op(q, k, v, ids, counts, lens, page)  # warm-up: the backend choice is made outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparse_decode_op(q, k, v, ids, counts, lens, page)
    graph.replay()
    before = out.clone()
    ids[0, 0, :2] = ids[1, 1, :2] = torch.tensor([1, 2], dtype=torch.int32, device="cuda")  # new lists, same buffers
    counts[0, 0] = counts[1, 1] = 2
    graph.replay()
    ref = sparse_decode_naive(q.float(), k.float(), v.float(), ids, counts, lens, page)
    assert rel_err(out, ref) < 1e-2 and not torch.equal(out, before)
