"""The Triton block-sparse prefill kernel against the PyTorch reference, and the reference against a
dense SDPA masked with the same layout.

On a machine without CUDA the kernel runs through Triton's interpreter (TRITON_INTERPRET=1, set below
before Triton is imported) at small shapes; the tests marked ``gpu`` run larger shapes on a CUDA device.
Every check draws fresh random inputs from a fixed seed, poisons the output with NaN first, and reports
the relative error ||out - ref|| / ||ref|| against a float32 reference.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from triton_harness import DEVICE, ON_GPU, gpu, needs_cuda, is_interpreted, rel_err, rerun_interpreted, runs_kernel_mark  # noqa: F401 (first: sets TRITON_INTERPRET)

triton = pytest.importorskip("triton")

from patchattn.kernels import available_backends, sparse_prefill  # noqa: E402
from patchattn.kernels.sparse_prefill.naive import sparse_prefill_naive  # noqa: E402
from patchattn.layout import causal_blocks, column_counts, finalize, num_blocks, to_indices, token_mask, window_blocks  # noqa: E402

kernel = importlib.import_module("patchattn.kernels.sparse_prefill.kernel")
INTERPRETED = is_interpreted(kernel._sparse_prefill_fwd)
runs_kernel = runs_kernel_mark(INTERPRETED)


# ----------------------------------------------------------------------------------------------- helpers
def make_layout(kind: str, batch: int, heads: int, n_blocks: int, gen: torch.Generator, device=DEVICE, window_rows: int = 0) -> torch.Tensor:
    """A finalized (causal, diagonal kept; with ``window_rows`` clipped to a sliding window) block layout of one of a
    few shapes."""
    q_blk = torch.arange(n_blocks)[:, None]
    k_blk = torch.arange(n_blocks)[None, :]
    if kind == "dense":
        keep = causal_blocks(n_blocks).expand(batch, heads, n_blocks, n_blocks)
    elif kind == "random":
        keep = torch.rand(batch, heads, n_blocks, n_blocks, generator=gen) < 0.4
    elif kind == "streaming":  # sink block + 2 blocks of local window
        keep = ((k_blk == 0) | (q_blk - k_blk <= 2)).expand(batch, heads, n_blocks, n_blocks)
    elif kind == "vertical_slash":  # a few random columns and a few random diagonals per head
        cols = torch.rand(batch, heads, 1, n_blocks, generator=gen) < 0.2
        diags = torch.rand(batch, heads, n_blocks, generator=gen) < 0.2
        offset = (q_blk - k_blk).clamp(min=0).expand(batch, heads, n_blocks, n_blocks)
        keep = cols | torch.gather(diags[:, :, None, :].expand(-1, -1, n_blocks, -1), -1, offset)
    elif kind == "diagonal":
        keep = torch.zeros(batch, heads, n_blocks, n_blocks, dtype=torch.bool)
    else:
        raise ValueError(kind)
    return finalize(keep.contiguous(), window_rows=window_rows).to(device)


def window_mask(n: int, window: int, device="cpu") -> torch.Tensor:
    """(n, n) bool: query t sees key s when t - window < s <= t (transformers' sliding window)."""
    pos = torch.arange(n, device=device)
    return (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)


def make_columns(batch: int, heads: int, n: int, gen: torch.Generator, share: float = 0.15, device=DEVICE) -> torch.Tensor:
    """Random token columns per head (a different number each), ascending, padded with ``n``: some fall in key
    blocks the layout holds anyway (the sink block, the diagonals), which a consumer must not count twice."""
    widest = max(1, int(share * n))
    cols = torch.full((batch, heads, widest), n, dtype=torch.int32)
    for b in range(batch):
        for h in range(heads):
            count = int(torch.randint(0, widest + 1, (1,), generator=gen))
            cols[b, h, :count] = torch.randperm(n, generator=gen)[:count].sort().values.int()
    return cols.to(device)


def check_kernel_columns(batch, n_q_heads, n_kv_heads, n, d, block_size, kind, dtype, seed, block_m=None, block_n=None,
                         use_tma=None, tol=1e-2, window=0):
    """The kernel with token columns besides the blocks (raw layout given for the duplicates) against the reference."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q_heads, n, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, n_kv_heads, n, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, n_kv_heads, n, d, generator=gen).to(DEVICE, dtype)
    n_blk = num_blocks(n, block_size)
    keep = make_layout(kind, batch, n_q_heads, n_blk, gen, window_rows=window_blocks(window, block_size))
    cols = make_columns(batch, n_q_heads, n, gen)
    col_counts = column_counts(cols, n_blk, block_size)
    counts, ids = to_indices(keep)
    out = torch.full_like(q, float("nan"))
    kernel.sparse_prefill_triton(q, k, v, counts, ids, block_size, block_m=block_m, block_n=block_n, use_tma=use_tma, out=out,
                                 columns=cols, column_counts=col_counts, column_keep=keep, window=window)
    ref = sparse_prefill_naive(q.float(), k.float(), v.float(), counts, ids, block_size, columns=cols, column_counts=col_counts, window=window)
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = rel_err(out, ref)
    print(f"\n  columns B={batch} Hq={n_q_heads} Hkv={n_kv_heads} N={n} d={d} bs={block_size} {kind} {dtype}: rel err {err:.2e}")
    assert err < tol, f"relative error {err:.3e} >= {tol}"
    without = sparse_prefill_naive(q.float(), k.float(), v.float(), counts, ids, block_size, window=window)
    assert rel_err(without, ref) > 10 * tol, "the columns should change the output (else this test checks nothing)"


def check_kernel(
    batch, n_q_heads, n_kv_heads, n, d, block_size, kind, dtype, seed, block_n=None, n_k=None, use_tma=None, block_m=None, tol=1e-2,
    window=0,
):
    gen = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k
    q = torch.randn(batch, n_q_heads, n, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, n_kv_heads, n_k, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, n_kv_heads, n_k, d, generator=gen).to(DEVICE, dtype)
    if n_k == n:
        keep = make_layout(kind, batch, n_q_heads, num_blocks(n, block_size), gen, window_rows=window_blocks(window, block_size))
    else:  # queries at the end of a longer key sequence (chunked prefill): every key block up to the row's last query
        last_pos = (torch.arange(num_blocks(n, block_size)) * block_size + block_size - 1).clamp(max=n - 1) + (n_k - n)
        keep = torch.arange(num_blocks(n_k, block_size))[None, :] * block_size <= last_pos[:, None]
        keep = keep.expand(batch, n_q_heads, -1, -1).contiguous().to(DEVICE)
    counts, ids = to_indices(keep)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    kernel.sparse_prefill_triton(q, k, v, counts, ids, block_size, block_m=block_m, block_n=block_n, use_tma=use_tma, out=out, window=window)
    ref = sparse_prefill_naive(q.float(), k.float(), v.float(), counts, ids, block_size, window=window)
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = rel_err(out, ref)
    print(f"\n  B={batch} Hq={n_q_heads} Hkv={n_kv_heads} N={n} Nk={n_k} d={d} bs={block_size} bm={block_m} bn={block_n} {kind} {dtype} tma={use_tma} window={window}: rel err {err:.2e}")
    assert err < tol, f"relative error {err:.3e} >= {tol}"
    if window:  # random inputs attend diffusely: the window's effect is compared with the kernel's own error
        unwindowed = sparse_prefill_naive(q.float(), k.float(), v.float(), counts, ids, block_size)
        assert rel_err(unwindowed, ref) > 10 * max(err, 1e-3), "the window should change the output (else this test checks nothing)"
    return err


# ------------------------------------------------------------------------------- reference vs dense SDPA
@pytest.mark.parametrize(
    "batch,hq,hkv,n,d,bs,kind",
    [(1, 4, 4, 200, 32, 64, "random"), (2, 4, 1, 150, 16, 32, "vertical_slash"), (1, 2, 2, 97, 16, 32, "streaming")],
)
def test_naive_matches_masked_sdpa(batch, hq, hkv, n, d, bs, kind):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(batch, hq, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, hkv, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, n, d, generator=gen, dtype=torch.float64)
    keep = make_layout(kind, batch, hq, num_blocks(n, bs), gen, device="cpu")
    counts, ids = to_indices(keep)
    out = sparse_prefill_naive(q, k, v, counts, ids, bs)
    group = hq // hkv
    mask = token_mask(keep, n, n, bs)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask
    )
    assert rel_err(out, ref) < 1e-5  # the reference computes in float32 whatever the input dtype


@pytest.mark.parametrize("window,bs,kind", [(40, 32, "dense"), (64, 32, "random"), (100, 16, "vertical_slash"), (7, 16, "dense")])
def test_naive_window_matches_masked_sdpa(window, bs, kind):
    """A model's sliding window: the reference given its size equals SDPA masked with the layout and the window,
    and equals the reference given the window as a mask; the layout finished with the window loses no key of it."""
    gen = torch.Generator().manual_seed(window)
    n, hq, hkv = 150, 4, 2
    q, k, v = (torch.randn(1, h, n, 16, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    n_blk = num_blocks(n, bs)
    keep = make_layout(kind, 1, hq, n_blk, torch.Generator().manual_seed(window), device="cpu", window_rows=window_blocks(window, bs))
    full = make_layout(kind, 1, hq, n_blk, torch.Generator().manual_seed(window), device="cpu")  # the same, unclipped
    counts, ids = to_indices(keep)
    out = sparse_prefill_naive(q, k, v, counts, ids, bs, window=window)
    mask = token_mask(keep, n, n, bs) & window_mask(n, window)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    assert rel_err(out, ref) < 1e-5
    as_mask = sparse_prefill_naive(q, k, v, *to_indices(full), bs, attn_mask=window_mask(n, window)[None, None])
    assert (token_mask(full, n, n, bs) & window_mask(n, window)).equal(mask), "window_rows dropped a key inside the window"
    assert rel_err(as_mask, out) < 1e-5


@pytest.mark.parametrize("batch,hq,hkv,n,bs,kind", [(1, 4, 2, 200, 32, "vertical_slash"), (2, 2, 1, 97, 16, "streaming"), (1, 2, 2, 130, 32, "dense")])
def test_naive_with_columns_matches_masked_sdpa(batch, hq, hkv, n, bs, kind):
    """Blocks plus token columns: the union of both, every column counted once (also where its block is kept)."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(batch, h, n, 16, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    n_blk = num_blocks(n, bs)
    keep = make_layout(kind, batch, hq, n_blk, gen, device="cpu")
    cols = make_columns(batch, hq, n, gen, share=0.3, device="cpu")
    col_counts = column_counts(cols, n_blk, bs)
    assert (col_counts[..., -1] == 0).all() and (column_counts(cols, n_blk, bs, dense_rows=2)[..., :2] == 0).all()
    counts, ids = to_indices(keep)
    out = sparse_prefill_naive(q, k, v, counts, ids, bs, columns=cols, column_counts=col_counts)
    mask = token_mask(keep, n, n, bs, cols, col_counts)
    group = hq // hkv
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask)
    assert rel_err(out, ref) < 1e-5
    if kind != "dense":
        assert (mask.sum() > token_mask(keep, n, n, bs).sum()), "the columns add keys"


# --------------------------------------------------------------------- kernel vs reference (small shapes)
# Triton's interpreter computes bfloat16 wrongly on CPU (numpy has no bfloat16): fp16 there, bf16 on GPU.
SMALL_DTYPE = torch.bfloat16 if ON_GPU else torch.float16


@pytest.mark.parametrize(
    "batch,hq,hkv,n,d,bs,kind,block_n",
    [
        (1, 4, 4, 200, 64, 64, "random", None),  # GQA group 1, N not a multiple of the block
        (1, 4, 1, 300, 128, 128, "random", None),  # group 4, d 128, block 128
        (2, 4, 1, 257, 64, 128, "dense", None),  # batch 2, one-token tail block
        (1, 8, 2, 300, 128, 64, "streaming", None),
        (1, 4, 2, 250, 64, 64, "vertical_slash", None),
        (1, 2, 1, 300, 64, 128, "random", 64),  # a layout block split into two key tiles
        (1, 2, 2, 129, 128, 64, "diagonal", None),
    ],
)
@runs_kernel
def test_kernel_matches_reference(batch, hq, hkv, n, d, bs, kind, block_n):
    check_kernel(batch, hq, hkv, n, d, bs, kind, SMALL_DTYPE, seed=n + d + bs, block_n=block_n)


@runs_kernel
@pytest.mark.parametrize(
    "n,d,bs,block_m,block_n,kind",
    [(300, 64, 128, 128, 128, "random"), (257, 64, 128, 128, 64, "dense"), (300, 128, 128, 64, 128, "streaming"), (190, 64, 64, 32, 32, "random")],
)
def test_kernel_tile_shapes(n, d, bs, block_m, block_n, kind):
    """Query tiles of the whole layout block or a part of it, key tiles of the whole block or a part."""
    check_kernel(1, 4, 2, n, d, bs, kind, SMALL_DTYPE, seed=n + block_m + block_n, block_m=block_m, block_n=block_n)


@runs_kernel
@pytest.mark.parametrize(
    "batch,hq,hkv,n,d,bs,kind,block_m,block_n",
    [(1, 4, 2, 200, 64, 64, "vertical_slash", None, None), (2, 2, 1, 600, 64, 128, "random", 64, 64),
     (1, 2, 2, 257, 128, 128, "diagonal", None, None)],
)
def test_kernel_columns_match_reference(batch, hq, hkv, n, d, bs, kind, block_m, block_n):
    check_kernel_columns(batch, hq, hkv, n, d, bs, kind, SMALL_DTYPE, seed=n + d, block_m=block_m, block_n=block_n)


@runs_kernel
@pytest.mark.parametrize(
    "n,d,bs,window,block_m,block_n,kind",
    [
        (300, 64, 64, 100, None, None, "dense"),  # window between one and two blocks
        (300, 64, 64, 40, None, None, "dense"),  # window inside one block: the diagonal stage masks it
        (400, 64, 64, 192, 32, 32, "random"),  # window a multiple of the block, partial query and key tiles
        (333, 128, 128, 200, 64, 64, "streaming"),
        (260, 256, 64, 130, None, None, "dense"),  # Gemma 3's head dim
        (200, 256, 128, 64, None, None, "vertical_slash"),
    ],
)
def test_kernel_window_matches_reference(n, d, bs, window, block_m, block_n, kind):
    check_kernel(1, 4, 1, n, d, bs, kind, SMALL_DTYPE, seed=n + window, block_m=block_m, block_n=block_n, window=window)


@runs_kernel
def test_kernel_window_with_columns():
    """Token columns under a sliding window: a column behind a query's window is not its key."""
    check_kernel_columns(1, 4, 2, 400, 64, 64, "vertical_slash", SMALL_DTYPE, seed=41, window=150)


@runs_kernel
def test_kernel_head_dim_256():
    check_kernel(1, 4, 2, 200, 256, 64, "random", SMALL_DTYPE, seed=256)


@runs_kernel
def test_kernel_queries_after_keys():
    check_kernel(1, 2, 1, 100, 64, 64, "dense", SMALL_DTYPE, seed=4, n_k=230)  # query t at Nk - N + t
    check_kernel(1, 2, 1, 200, 64, 128, "dense", SMALL_DTYPE, seed=5, n_k=301, block_m=64)


@pytest.mark.skipif(ON_GPU or INTERPRETED, reason="the kernel tests run in this process")
def test_kernel_in_interpreter_subprocess():
    """Triton was imported before the interpreter could be switched on: run this file's kernel tests anew."""
    rerun_interpreted(__file__, "kernel_matches_reference or queries_after_keys or tile_shapes or kernel_columns or kernel_window or head_dim_256", timeout_s=900)


# ------------------------------------------------------------------------------------------- dispatch
def test_dispatch_backends():
    assert "torch" in available_backends()
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 70, 64, generator=gen)
    keep = make_layout("random", 1, 2, num_blocks(70, 64), gen, device="cpu")
    counts, ids = to_indices(keep)
    ref = sparse_prefill_naive(q, q, q, counts, ids, 64)
    assert torch.equal(sparse_prefill(q, q, q, counts, ids, 64), ref)  # auto on fp32 / CPU: the reference
    assert torch.equal(sparse_prefill(q, q, q, counts, ids, 64, backend="torch"), ref)
    with pytest.raises(ValueError, match="float16 or bfloat16|CUDA"):
        sparse_prefill(q, q, q, counts, ids, 64, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        sparse_prefill(q, q, q, counts, ids, 64, backend="cuda")


@needs_cuda
def test_dispatch_on_gpu():
    assert "triton" in available_backends()
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 300, 128, generator=gen).cuda().bfloat16()
    k = torch.randn(1, 2, 300, 128, generator=gen).cuda().bfloat16()
    keep = make_layout("random", 1, 4, num_blocks(300, 64), gen)
    counts, ids = to_indices(keep)
    fast = sparse_prefill(q, k, k, counts, ids, 64)
    assert torch.equal(fast, kernel.sparse_prefill_triton(q, k, k, counts, ids, 64))
    mask = torch.ones(1, 1, 300, 300, dtype=torch.bool, device="cuda")
    masked = sparse_prefill(q, k, k, counts, ids, 64, attn_mask=mask)  # falls back to the reference
    assert rel_err(masked, fast) < 1e-2
    with pytest.raises(ValueError, match="attn_mask"):
        sparse_prefill(q, k, k, counts, ids, 64, attn_mask=mask, backend="triton")
    with pytest.raises(ValueError, match="head dim"):
        sparse_prefill(q[..., :96], k[..., :96], k[..., :96], counts, ids, 64, backend="triton")


# --------------------------------------------------------------------------------- larger, GPU only
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch,hq,hkv,n,d,bs,kind,block_n",
    [
        (1, 32, 8, 4100, 128, 128, "dense", None),
        (1, 32, 8, 4100, 128, 128, "random", None),
        (2, 8, 8, 3000, 64, 64, "vertical_slash", None),
        (1, 16, 4, 5000, 128, 64, "streaming", None),
        (1, 8, 2, 2049, 64, 128, "random", 64),
        (1, 8, 8, 2000, 128, 128, "diagonal", 64),
    ],
)
def test_kernel_matches_reference_gpu(batch, hq, hkv, n, d, bs, kind, block_n, dtype):
    check_kernel(batch, hq, hkv, n, d, bs, kind, dtype, seed=n + d + bs, block_n=block_n)


@gpu
@needs_cuda
@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize(
    "batch,hq,hkv,n,d,bs,kind,block_n",
    [(2, 8, 2, 3001, 128, 128, "random", None), (1, 8, 8, 2500, 64, 64, "vertical_slash", None), (1, 4, 1, 1000, 128, 128, "dense", 64)],
)
@pytest.mark.parametrize("block_m", [None, 128])
def test_kernel_load_paths_gpu(batch, hq, hkv, n, d, bs, kind, block_n, use_tma, block_m):
    """Both ways of loading K/V (pointers, TMA descriptors where the GPU has them) give the reference."""
    if block_m is not None and block_m > bs:
        pytest.skip("block_m larger than the layout block")
    check_kernel(batch, hq, hkv, n, d, bs, kind, torch.bfloat16, seed=n + 1, block_n=block_n, use_tma=use_tma, block_m=block_m)


@gpu
@needs_cuda
@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize(
    "hq,hkv,n,d,bs,window,kind",
    [(4, 1, 8192, 256, 64, 512, "dense"), (4, 1, 5000, 256, 128, 512, "random"), (32, 8, 8300, 128, 64, 4096, "dense"),
     (16, 4, 3001, 128, 128, 1000, "vertical_slash"), (8, 2, 2049, 64, 64, 96, "streaming")],
)
def test_kernel_window_gpu(hq, hkv, n, d, bs, window, kind, use_tma):
    check_kernel(1, hq, hkv, n, d, bs, kind, torch.bfloat16, seed=n + window, use_tma=use_tma, window=window)
    if kind == "vertical_slash":
        check_kernel_columns(1, hq, hkv, n, d, bs, kind, torch.bfloat16, seed=n, use_tma=use_tma, window=window)
    if d == 256 and kind == "dense":
        check_kernel_columns(1, hq, hkv, n, d, bs, "vertical_slash", torch.bfloat16, seed=n, use_tma=use_tma, window=window)


@gpu
@needs_cuda
@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize(
    "batch,hq,hkv,n,d,bs,kind,block_m",
    [(1, 32, 8, 8192, 128, 64, "vertical_slash", None), (2, 8, 2, 3001, 64, 64, "streaming", None),
     (1, 8, 2, 4100, 128, 128, "random", None), (1, 8, 2, 4100, 128, 128, "diagonal", 64)],
)
def test_kernel_columns_gpu(batch, hq, hkv, n, d, bs, kind, block_m, use_tma):
    check_kernel_columns(batch, hq, hkv, n, d, bs, kind, torch.bfloat16, seed=n + 3, block_m=block_m, use_tma=use_tma)


@gpu
@needs_cuda
@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernel_on_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current (a model spread over GPUs): the kernel launches on the tensors' GPU."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(1, 8, 1000, 128, generator=gen).bfloat16()
    k = torch.randn(1, 2, 1000, 128, generator=gen).bfloat16()
    keep = make_layout("random", 1, 8, num_blocks(1000, 64), gen, device="cpu")
    counts, ids = to_indices(keep)
    ref = sparse_prefill_naive(q.float(), k.float(), k.float(), counts, ids, 64)
    with torch.cuda.device(0):
        out = kernel.sparse_prefill_triton(*(t.to("cuda:1") for t in (q, k, k, counts, ids)), 64)
        torch.cuda.synchronize(1)
    assert out.device == torch.device("cuda:1") and rel_err(out.cpu(), ref) < 1e-2


@gpu
@needs_cuda
def test_dense_layout_matches_sdpa_gpu():
    gen = torch.Generator().manual_seed(11)
    n, bs = 8192, 128
    q = torch.randn(1, 32, n, 128, generator=gen).cuda().bfloat16()
    k = torch.randn(1, 8, n, 128, generator=gen).cuda().bfloat16()
    v = torch.randn(1, 8, n, 128, generator=gen).cuda().bfloat16()
    counts, ids = to_indices(make_layout("dense", 1, 32, num_blocks(n, bs), gen))
    out = kernel.sparse_prefill_triton(q, k, v, counts, ids, bs)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1), is_causal=True
    )
    err = rel_err(out, ref)
    print(f"\n  dense 8K vs float32 SDPA: rel err {err:.2e}")
    assert err < 1e-2


def test_launch_config_follows_layout_density(monkeypatch):
    """Tiles are picked by the share of causal blocks a layout keeps (every finalized layout has one full row, so the
    longest row says nothing): near-dense layouts take the 64-row config, sparse ones the 128-row one."""
    launches = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(kernel, "_sparse_prefill_fwd", FakeKernel())
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 512, 128, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 1, 512, 128, generator=gen).to(torch.bfloat16)
    counts, ids = to_indices(make_layout("diagonal", 1, 2, 4, gen, device="cpu"))
    for density, expected in ((0.9, kernel.CONFIGS[(128, 128)]["dense"]), (0.1, kernel.CONFIGS[(128, 128)]["sparse"]),
                              (None, kernel.CONFIGS[(128, 128)]["dense"])):  # no density: the full last row decides
        kernel.sparse_prefill_triton(q, k, k, counts, ids, 128, density=density)
        got = launches[-1]
        assert (got["BLOCK_M"], got["BLOCK_N"], got["num_warps"], got["num_stages"]) == expected
