"""The Triton page-sparse decode kernel against the PyTorch reference, and the reference against a dense SDPA
masked with the same token set.

On a machine without CUDA the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set below before
Triton is imported) at tiny shapes; the tests marked ``gpu`` run real shapes on a CUDA device. Every check
draws fresh random inputs from a fixed seed, poisons the output with NaN first, and reports the relative
error ||out - ref|| / ||ref|| against a float32 reference.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from triton_harness import DEVICE, ON_GPU, gpu, needs_cuda, is_interpreted, rel_err, rerun_interpreted, runs_kernel_mark  # noqa: F401 (first: sets TRITON_INTERPRET)

triton = pytest.importorskip("triton")

from patchattn.kernels import sparse_decode  # noqa: E402
from patchattn.kernels.sparse_decode.naive import sparse_decode_naive  # noqa: E402

kernel = importlib.import_module("patchattn.kernels.sparse_decode.kernel")
INTERPRETED = is_interpreted(kernel._sparse_decode_split)
runs_kernel = runs_kernel_mark(INTERPRETED)
# Triton's interpreter computes bfloat16 wrongly on CPU (numpy has no bfloat16): fp16 there, bf16 on GPU.
SMALL_DTYPE = torch.bfloat16 if ON_GPU else torch.float16


# ----------------------------------------------------------------------------------------------- helpers
def make_pages(kind: str, seq_lens: list[int], n_kv_heads: int, s_max: int, page_size: int, gen: torch.Generator):
    """(page_ids (B, Hkv, max_pages) int32, page_counts (B, Hkv) int32) of one kind; padding slots hold junk.

    full: every page up to seq_len. sparse: sink page + last page + ~30% of the others at random, per head.
    varcount: a random number of random pages per head (1 included). one: a single random page per head.
    """
    batch = len(seq_lens)
    max_pages = triton.cdiv(s_max, page_size)
    ids = torch.randint(0, 1 << 20, (batch, n_kv_heads, max_pages), generator=gen, dtype=torch.int32)  # junk
    counts = torch.zeros(batch, n_kv_heads, dtype=torch.int32)
    for b, seq_len in enumerate(seq_lens):
        n_pages = triton.cdiv(seq_len, page_size)
        for h in range(n_kv_heads):
            if kind == "full":
                chosen = torch.arange(n_pages)
            elif kind == "sparse":
                keep = torch.rand(n_pages, generator=gen) < 0.3
                keep[0] = keep[-1] = True
                chosen = keep.nonzero()[:, 0]
            elif kind == "varcount":
                n = int(torch.randint(1, n_pages + 1, (1,), generator=gen)) if h else 1
                chosen = torch.randperm(n_pages, generator=gen)[:n].sort().values
            elif kind == "one":
                chosen = torch.randint(0, n_pages, (1,), generator=gen)
            else:
                raise ValueError(kind)
            ids[b, h, : len(chosen)] = chosen.to(torch.int32)
            counts[b, h] = len(chosen)
    return ids, counts


def make_inputs(batch, n_q_heads, n_kv_heads, s_max, d, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q_heads, d, generator=gen).to(device, dtype)
    k = torch.randn(batch, n_kv_heads, s_max, d, generator=gen).to(device, dtype)
    v = torch.randn(batch, n_kv_heads, s_max, d, generator=gen).to(device, dtype)
    return q, k, v, gen


def check_kernel(batch, hq, hkv, s_max, d, page_size, kind, dtype, seed, seq_lens=None, tol=1e-2, **overrides):
    q, k, v, gen = make_inputs(batch, hq, hkv, s_max, d, dtype, seed)
    seq_lens = seq_lens or [s_max] * batch
    ids, counts = make_pages(kind, seq_lens, hkv, s_max, page_size, gen)
    ids, counts, lens = ids.to(DEVICE), counts.to(DEVICE), torch.tensor(seq_lens, device=DEVICE)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    kernel.sparse_decode_triton(q, k, v, ids, counts, lens, page_size, out=out, **overrides)
    ref = sparse_decode_naive(q.float(), k.float(), v.float(), ids, counts, lens, page_size)
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = rel_err(out, ref)
    print(f"\n  B={batch} Hq={hq} Hkv={hkv} S={s_max} lens={seq_lens} d={d} page={page_size} {kind} {dtype} {overrides}: rel err {err:.2e}")
    assert err < tol, f"relative error {err:.3e} >= {tol}"
    return err


# ------------------------------------------------------------------------------- reference vs dense SDPA
@pytest.mark.parametrize(
    "batch,hq,hkv,s_max,d,page_size,kind,seq_lens",
    [(2, 4, 4, 100, 16, 16, "sparse", [100, 37]), (2, 8, 2, 130, 32, 32, "varcount", [130, 65]), (1, 8, 1, 90, 16, 64, "full", [77])],
)
def test_naive_matches_masked_sdpa(batch, hq, hkv, s_max, d, page_size, kind, seq_lens):
    q, k, v, gen = make_inputs(batch, hq, hkv, s_max, d, torch.float64, seed=s_max + d, device="cpu")
    ids, counts = make_pages(kind, seq_lens, hkv, s_max, page_size, gen)
    out = sparse_decode_naive(q, k, v, ids, counts, torch.tensor(seq_lens), page_size)
    mask = torch.zeros(batch, hkv, s_max, dtype=torch.bool)  # the same token set as a dense mask
    for b in range(batch):
        for h in range(hkv):
            for page in ids[b, h, : counts[b, h]].tolist():
                mask[b, h, page * page_size : min((page + 1) * page_size, seq_lens[b])] = True
    group = hq // hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=mask.repeat_interleave(group, 1)[:, :, None], enable_gqa=True
    )[:, :, 0]
    assert rel_err(out, ref) < 1e-10  # float64 in, float64 arithmetic


# --------------------------------------------------------------------- kernel vs reference (tiny shapes)
@runs_kernel
@pytest.mark.parametrize(
    "batch,hq,hkv,s_max,d,page_size,kind,seq_lens",
    [
        (2, 2, 2, 100, 64, 16, "full", [100, 61]),  # GQA group 1, partial last page, lengths differ per row
        (2, 8, 2, 200, 64, 32, "sparse", [200, 113]),  # group 4
        (1, 8, 1, 300, 128, 64, "varcount", [290]),  # group 8, d 128, counts 1..n per head
        (2, 8, 2, 150, 64, 16, "one", [150, 20]),  # one page per head
        (1, 4, 1, 200, 256, 32, "sparse", [190]),  # Gemma 3's head dim
    ],
)
def test_kernel_matches_reference(batch, hq, hkv, s_max, d, page_size, kind, seq_lens):
    check_kernel(batch, hq, hkv, s_max, d, page_size, kind, SMALL_DTYPE, seed=s_max + d + page_size, seq_lens=seq_lens)


@runs_kernel
@pytest.mark.parametrize(
    "overrides", [dict(num_splits=1), dict(num_splits=3), dict(num_splits=9), dict(num_splits=3, combine="torch"), dict(block_n=128)]
)
def test_kernel_splits_and_tiles(overrides):
    """One program per head (direct output), several (combined; some of them empty), several pages per tile."""
    check_kernel(2, 8, 2, 180, 64, 16, "varcount", SMALL_DTYPE, seed=3, seq_lens=[180, 97], **overrides)


@runs_kernel
def test_kernel_empty_list_gives_zero():
    q, k, v, _ = make_inputs(1, 4, 2, 64, 64, SMALL_DTYPE, seed=9)
    ids = torch.zeros(1, 2, 4, dtype=torch.int32, device=DEVICE)
    counts = torch.tensor([[0, 2]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([64], device=DEVICE)
    ref = sparse_decode_naive(q.float(), k.float(), v.float(), ids, counts, lens, 16)
    for splits in (1, 2):
        out = kernel.sparse_decode_triton(q, k, v, ids, counts, lens, 16, num_splits=splits)
        assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2])) and rel_err(out, ref) < 1e-2


def make_pool(batch, hq, hkv, region_tokens, lens, d, page_size, dtype, seed, device=DEVICE):
    """Heads sharing one pool (B, C, D): head h owns a page-aligned region of ``region_tokens[h]`` slots whose
    first ``lens[h]`` are valid; returns q, the pool views (zero head stride), page lists, counts, limits."""
    gen = torch.Generator().manual_seed(seed)
    caps = [triton.cdiv(r, page_size) * page_size for r in region_tokens]
    offsets = [sum(caps[:h]) for h in range(hkv)]
    total = sum(caps)
    q = torch.randn(batch, hq, d, generator=gen).to(device, dtype)
    k_pool = torch.randn(batch, total, d, generator=gen).to(device, dtype)
    v_pool = torch.randn(batch, total, d, generator=gen).to(device, dtype)
    max_pages = max(triton.cdiv(n, page_size) for n in lens)
    ids = torch.zeros(batch, hkv, max_pages, dtype=torch.int32)
    counts = torch.zeros(batch, hkv, dtype=torch.int32)
    for h in range(hkv):
        n_pages = triton.cdiv(lens[h], page_size)
        pages = torch.randperm(n_pages, generator=gen) + offsets[h] // page_size  # any order: softmax does not care
        ids[:, h, :n_pages] = pages.to(torch.int32)
        counts[:, h] = n_pages
    limits = torch.tensor([[offsets[h] + lens[h] for h in range(hkv)]] * batch, dtype=torch.int32)
    k_view = k_pool[:, None].expand(batch, hkv, total, d)
    v_view = v_pool[:, None].expand(batch, hkv, total, d)
    return q, k_view, v_view, ids.to(device), counts.to(device), limits.to(device)


def test_naive_pool_matches_per_head_sdpa():
    """The pooled form (zero head stride, per-head limits): each head attends exactly its own valid slots."""
    q, kv, vv, ids, counts, limits = make_pool(2, 8, 4, [40, 100, 33, 64], [40, 70, 1, 64], 32, 16, torch.float64, 1, "cpu")
    out = sparse_decode_naive(q, kv, vv, ids, counts, limits, 16)
    for h in range(4):
        start = int(limits[0, h]) - [40, 70, 1, 64][h]
        k_h = kv[:, h, start : int(limits[0, h])]
        v_h = vv[:, h, start : int(limits[0, h])]
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, 2 * h : 2 * h + 2, None], k_h[:, None], v_h[:, None])[:, :, 0]
        assert rel_err(out[:, 2 * h : 2 * h + 2], ref) < 1e-10


@runs_kernel
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_kernel_pool_matches_reference(splits):
    q, kv, vv, ids, counts, limits = make_pool(2, 8, 4, [40, 100, 33, 64], [40, 70, 1, 64], 64, 16, SMALL_DTYPE, 2)
    out = torch.full_like(q, float("nan"))
    kernel.sparse_decode_triton(q, kv, vv, ids, counts, limits, 16, out=out, num_splits=splits)
    ref = sparse_decode_naive(q.float(), kv.float(), vv.float(), ids, counts, limits, 16)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the kernel tests run in this process")
def test_kernel_in_interpreter_subprocess():
    """Triton was imported before the interpreter could be switched on: run this file's kernel tests anew."""
    rerun_interpreted(__file__, "kernel_matches_reference or splits_and_tiles or empty_list or kernel_pool", timeout_s=600)


# ------------------------------------------------------------------------------------------- dispatch
def test_dispatch_backends():
    q, k, v, gen = make_inputs(1, 4, 2, 70, 64, torch.float32, seed=5, device="cpu")
    ids, counts = make_pages("sparse", [70], 2, 70, 16, gen)
    lens = torch.tensor([70])
    ref = sparse_decode_naive(q, k, v, ids, counts, lens, 16)
    assert torch.equal(sparse_decode(q, k, v, ids, counts, lens, 16), ref)  # auto on fp32 / CPU: the reference
    assert torch.equal(sparse_decode(q, k, v, ids, counts, lens, 16, backend="torch"), ref)
    with pytest.raises(ValueError, match="float16 or bfloat16|CUDA"):
        sparse_decode(q, k, v, ids, counts, lens, 16, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        sparse_decode(q, k, v, ids, counts, lens, 16, backend="cuda")


@needs_cuda
def test_dispatch_on_gpu():
    q, k, v, gen = make_inputs(1, 8, 2, 500, 128, torch.bfloat16, seed=6)
    ids, counts = make_pages("sparse", [500], 2, 500, 16, gen)
    ids, counts, lens = ids.cuda(), counts.cuda(), torch.tensor([500], device="cuda")
    fast = sparse_decode(q, k, v, ids, counts, lens, 16)
    assert torch.equal(fast, kernel.sparse_decode_triton(q, k, v, ids, counts, lens, 16))
    with pytest.raises(ValueError, match="page_size"):
        sparse_decode(q, k, v, ids, counts, lens, 24, backend="triton")
    assert rel_err(sparse_decode(q, k, v, ids, counts, lens, 24), sparse_decode_naive(q, k, v, ids, counts, lens, 24)) == 0


# --------------------------------------------------------------------------------- real shapes, GPU only
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [16, 32, 64])
@pytest.mark.parametrize("kind", ["full", "sparse", "varcount"])
def test_kernel_llama_shape_gpu(kind, page_size, dtype):
    check_kernel(4, 32, 8, 8200, 128, page_size, kind, dtype, seed=page_size, seq_lens=[8200, 8191, 4100, 17])


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "batch,hq,hkv,s_max,d,page_size,kind",
    [(2, 8, 8, 6000, 64, 16, "sparse"), (2, 32, 4, 6000, 64, 32, "full"), (1, 16, 2, 20000, 128, 64, "one"), (3, 28, 4, 3000, 128, 128, "varcount"),
     (1, 4, 1, 20000, 256, 16, "sparse")],
)
@pytest.mark.parametrize("overrides", [{}, dict(num_splits=1), dict(num_splits=5, combine="torch"), dict(block_n=128, num_warps=8)])
def test_kernel_groups_and_overrides_gpu(batch, hq, hkv, s_max, d, page_size, kind, overrides):
    """GQA groups 1 / 8 / 7 (padded), d 64 and 256, page 128, and every override path."""
    if d == 256 and overrides.get("block_n") == 128:
        pytest.skip("128-token tiles of d=256 keys and values overflow shared memory at three stages")
    check_kernel(batch, hq, hkv, s_max, d, page_size, kind, torch.bfloat16, seed=s_max, seq_lens=[s_max - 3 * i for i in range(batch)], **overrides)


@gpu
@needs_cuda
def test_full_cache_matches_sdpa_gpu():
    q, k, v, gen = make_inputs(1, 32, 8, 32768, 128, torch.bfloat16, seed=11)
    ids, counts = make_pages("full", [32768], 8, 32768, 16, gen)
    out = kernel.sparse_decode_triton(q, k, v, ids.cuda(), counts.cuda(), torch.tensor([32768], device="cuda"), 16)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(), enable_gqa=True)[:, :, 0]
    err = rel_err(out, ref)
    print(f"\n  full cache 32K vs float32 SDPA: rel err {err:.2e}")
    assert err < 1e-2
