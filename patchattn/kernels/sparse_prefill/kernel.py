"""Triton block-sparse causal attention for prefill (a FlashAttention-2 forward over a ragged block list).

Contract (identical to :func:`patchattn.kernels.sparse_prefill.naive.sparse_prefill_naive`, minus
``attn_mask``):

    sparse_prefill_triton(q, k, v, kv_block_counts, kv_block_ids, block_size, scale=None) -> (B, Hq, N, D)

* ``q`` (B, Hq, N, D); ``k``, ``v`` (B, Hkv, Nk, D), Hq a multiple of Hkv: query head ``h`` reads KV head
  ``h // (Hq // Hkv)`` (indexed in the kernel, K/V are never copied or expanded).
* ``kv_block_counts`` (B, Hq, ceil(N / block_size)) int32 and ``kv_block_ids`` (B, Hq, ceil(N / block_size),
  max_count) int32, as :func:`patchattn.layout.to_indices` makes them: the first ``count`` ids of a row are
  the kept key blocks in ascending order. Layouts are causal and keep the diagonal block.
* Query token ``t`` sits at absolute position ``Nk - N + t`` and sees keys at positions <= its own.
* fp16 or bf16, head dim 64, 128 or 256, ``block_size`` 64 or 128, any N (tails are masked), Nk >= N.
* ``window`` (optional): a sliding window of that many positions (Gemma, Mistral), masked in the kernel.
* Returns q's dtype; softmax statistics and the output are accumulated in float32.
* Token columns (optional, ``columns=``, ``column_counts=``, ``column_keep=``; prefill with Nk == N): single key
  positions a head reads besides its blocks (see :func:`sparse_prefill_triton`).

The program itself (tiles, stages, TMA, the column gather) is :mod:`.fwd`; this module checks the inputs, picks the
launch configuration and launches it.
"""

from __future__ import annotations

import math

import torch
import triton

from ...input_device import launches_on_input_device
from .fwd import _sparse_prefill_fwd  # looked up here at launch time (tests replace it)

try:  # host-side tensor descriptors (TMA), Triton >= 3.4; the pointer path needs nothing
    from triton.tools.tensor_descriptor import TensorDescriptor

    _HAVE_TMA = True
except ImportError:  # pragma: no cover
    TensorDescriptor = None
    _HAVE_TMA = False

LOG2E = 1.4426950408889634
# Load K/V through TMA tensor descriptors on Hopper+ (when contiguous). Measured: see NOTES_prefill.md.
USE_TMA = True

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_BLOCK_SIZES = (64, 128)

# Launch configurations: BLOCK_M (query rows per program, divides block_size), BLOCK_N (keys per tile,
# divides block_size), num_warps, num_stages. Two per (head_dim, block_size), picked by how full the layout's
# layout is (``density``, its share of the causal blocks, which to_ragged reads with the layout's longest row;
# without it the longest row, a shape, stands in, but every finalized layout has one full row, its last): near-dense rows run best as 64-row query tiles with a
# deep TMA pipeline (H100, 32K dense: ~505 TF/s vs ~465 with 128-row tiles); sparse, scattered rows run best
# as 128-row tiles, which read each K/V block once for twice the queries (128K, 10% density: 35 ms vs 57 ms).
# d=128 measured on an H100 (benchmarks/NOTES_prefill.md); the d=64 rows reuse the shapes, untuned.
CONFIGS: dict[tuple[int, int], dict[str, tuple[int, int, int, int]]] = {
    (64, 64): {"dense": (64, 64, 4, 5), "sparse": (64, 64, 4, 5)},
    (64, 128): {"dense": (64, 64, 4, 5), "sparse": (128, 128, 8, 3)},
    (128, 64): {"dense": (64, 64, 4, 5), "sparse": (64, 64, 4, 5)},
    (128, 128): {"dense": (64, 64, 4, 5), "sparse": (128, 128, 8, 3)},
    # d=256 (Gemma 3): swept on an H100 over Gemma 3 270M's sliding layers at 32K (window 512; 4 q / 1 KV head;
    # benchmarks/prefill_window.py --sweep): 64 x 64 tiles, 4 warps, no pipelining 0.226 ms (the first guess,
    # 64 x 32 / 8 warps / 2 stages, 0.507); at block 128, 128 x 64 / 8 warps / 3 stages 0.234. Dense rows untimed.
    (256, 64): {"dense": (64, 64, 4, 1), "sparse": (64, 64, 4, 1)},
    (256, 128): {"dense": (64, 64, 4, 1), "sparse": (128, 64, 8, 3)},
}
# Software-pipeline depth of the token-column gather loop (index load -> K/V row gathers); None: the launch's
# num_stages. Measured on an H100 (10% token vertical-slash, 128K, bs 128): None 46.8 ms, 1: 63.8, 2: 55.5, 3: 47.7.
COLUMN_STAGES = None
DENSE_FRACTION = 0.5  # "dense" config when the layout keeps this share of the causal blocks (or its longest row of the key blocks)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> str | None:
    """Why the kernel cannot take these inputs, or None if it can (device checked by the caller)."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16 or bfloat16)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k and v must share one dtype"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]} (the kernel takes {SUPPORTED_HEAD_DIMS}, equal for q, k and v)"
    if block_size not in SUPPORTED_BLOCK_SIZES:
        return f"block_size {block_size} (the kernel takes {SUPPORTED_BLOCK_SIZES})"
    if q.shape[1] % k.shape[1] != 0 or k.shape[1] != v.shape[1]:
        return "Hq must be a multiple of Hkv (and k, v must have the same heads)"
    if k.shape[2] < q.shape[2]:
        return "Nk < N"
    return None


@launches_on_input_device
def sparse_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_counts: torch.Tensor,
    kv_block_ids: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool | None = None,
    warp_specialize: bool = False,
    out: torch.Tensor | None = None,
    density: float | None = None,
    columns: torch.Tensor | None = None,
    column_counts: torch.Tensor | None = None,
    column_keep: torch.Tensor | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Block-sparse causal attention (see the module docstring for the contract).

    ``block_m``, ``block_n``, ``num_warps``, ``num_stages`` override the :data:`CONFIGS` table (for
    benchmarking);
    ``use_tma`` (default :data:`USE_TMA` on Hopper or newer with contiguous K/V) loads K and V through
    tensor descriptors (the TMA copy engine) instead of pointer arithmetic; ``warp_specialize`` asks
    Triton to warp-specialize the main loop (experimental, off by default);
    ``out`` (optional, q's shape and dtype, unit stride on the head dim) receives the result;
    ``density`` (share of the causal blocks kept, as :func:`patchattn.layout.to_ragged` returns it) picks the
    launch configuration; without it the longest row does.
    Token columns (prefill, Nk == N): ``columns`` (B, Hq, C) ascending key positions, ``column_counts``
    (B, Hq, n_q_blocks) how many of them each query block reads (:func:`patchattn.layout.column_counts`), and
    ``column_keep`` (B, Hq, n_q_blocks, n_k_blocks) bool, the block layout (raw or finished): a column in a block it
    holds is skipped, so a row reads the union of its blocks and its columns, as the reference does.
    ``window`` > 0 (prefill, Nk == N): a sliding window, as transformers' models define theirs: query ``t`` sees key
    ``s`` only if ``t - window < s <= t``. The layout must then hold only blocks with a key inside the window of their
    row's first query (:func:`patchattn.layout.finalize` with ``window_rows``, from :func:`~patchattn.layout.window_blocks`), as it keeps the window masks to the
    first two blocks of a row.
    """
    reason = unsupported_reason(q, k, v, block_size)
    if reason is not None:
        raise ValueError(f"sparse_prefill_triton: unsupported input: {reason}")
    batch, n_q_heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    n_q_blocks = triton.cdiv(n_q, block_size)
    if kv_block_counts.shape != (batch, n_q_heads, n_q_blocks) or kv_block_ids.shape[:3] != (batch, n_q_heads, n_q_blocks):
        raise ValueError(
            f"layout shape {tuple(kv_block_counts.shape)} / {tuple(kv_block_ids.shape)} does not match "
            f"(B, Hq, n_q_blocks) = {(batch, n_q_heads, n_q_blocks)}"
        )
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    # The kernel needs unit stride on the head dim; everything else is passed as strides.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    counts = kv_block_counts.to(torch.int32).contiguous()
    ids = kv_block_ids.to(torch.int32)
    if ids.stride(-1) != 1:
        ids = ids.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError("out must have q's shape, dtype and device, and unit stride on the head dim")
    column_args = _column_operands(columns, column_counts, column_keep, counts, n_q, n_k, triton.cdiv(n_k, block_size))
    window = int(window or 0)
    if window < 0 or window and n_k != n_q:
        raise ValueError(f"window {window}: a sliding window must be >= 0 and is for prefill (Nk == N)")
    fill = ids.shape[-1] / triton.cdiv(n_k, block_size) if density is None else density
    _launch(q, k, v, out, counts, ids, column_args, block_size, scale, window, fill,
            block_m, block_n, num_warps, num_stages, use_tma, warp_specialize)
    return out


def _column_operands(columns: torch.Tensor | None, column_counts: torch.Tensor | None, column_keep: torch.Tensor | None,
                     counts: torch.Tensor, n_q: int, n_k: int, n_k_blocks: int) -> tuple | None:
    """The token-column operands as the kernel takes them, (columns, column counts, keep bytes, their 7 strides), after
    checking their shapes against the layout's ``counts`` (B, Hq, n_q_blocks); None without columns."""
    if columns is None:
        return None
    batch, n_q_heads, n_q_blocks = counts.shape
    if n_k != n_q:
        raise ValueError("token columns are for prefill (Nk == N)")
    if columns.shape[:2] != (batch, n_q_heads) or column_counts.shape != (batch, n_q_heads, n_q_blocks):
        raise ValueError(f"columns {tuple(columns.shape)} / column_counts {tuple(column_counts.shape)} do not match (B, Hq) = {(batch, n_q_heads)}")
    if column_keep is None or column_keep.shape != (batch, n_q_heads, n_q_blocks, n_k_blocks):
        raise ValueError("columns need column_keep, the (B, Hq, n_q_blocks, n_k_blocks) block layout")
    cols = columns.to(torch.int32)
    cols = cols if cols.stride(-1) == 1 else cols.contiguous()
    col_counts = column_counts.to(torch.int32)
    keep_u8 = column_keep.to(torch.uint8) if column_keep.dtype != torch.uint8 else column_keep
    keep_u8 = keep_u8 if keep_u8.stride(-1) == 1 else keep_u8.contiguous()
    col_strides = (cols.stride(0), cols.stride(1), col_counts.stride(0), col_counts.stride(1),
                   keep_u8.stride(0), keep_u8.stride(1), keep_u8.stride(2))
    return cols, col_counts, keep_u8, col_strides


def _launch(q, k, v, out, counts, ids, column_args: tuple | None, block_size: int, scale: float, window: int, fill: float,
            block_m, block_n, num_warps, num_stages, use_tma, warp_specialize: bool) -> None:
    """Pick the launch configuration (:data:`CONFIGS` by head dim, block size and the layout's ``fill``, unless
    overridden), load K/V through TMA descriptors where it can, and run the kernel into ``out``, retrying with a
    shallower pipeline where shared memory runs out."""
    batch, n_q_heads, n_q, head_dim = q.shape
    n_kv_heads, n_k = k.shape[1], k.shape[2]
    cols, col_counts, keep_u8, col_strides = column_args or (counts, counts, counts, (0,) * 7)  # unused without columns
    kind = "dense" if fill >= DENSE_FRACTION else "sparse"
    cfg_m, cfg_n, cfg_w, cfg_s = CONFIGS[(head_dim, block_size)][kind]
    block_m, block_n = block_m or cfg_m, block_n or cfg_n
    if block_size % block_n or block_size % block_m:
        raise ValueError(f"block_m {block_m} and block_n {block_n} must divide block_size {block_size}")
    tma_ok = _HAVE_TMA and k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9
    tma_ok = tma_ok and k.is_contiguous() and v.is_contiguous()
    use_tma = (USE_TMA if use_tma is None else use_tma) and tma_ok
    k_arg, v_arg = k, v
    if use_tma:
        k_arg = TensorDescriptor.from_tensor(k.view(-1, head_dim), [block_n, head_dim])
        v_arg = TensorDescriptor.from_tensor(v.view(-1, head_dim), [block_n, head_dim])

    n_programs_m = triton.cdiv(n_q, block_m)  # query tiles; tile i reads layout row i // (block_size // block_m)
    grid = (batch * n_q_heads, n_programs_m)
    num_warps = num_warps or cfg_w
    num_stages = num_stages or cfg_s
    while True:
        try:
            _sparse_prefill_fwd[grid](
                q, k_arg, v_arg, out, counts, ids,
                k, v, cols, col_counts, keep_u8,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                counts.stride(0), counts.stride(1),
                ids.stride(0), ids.stride(1), ids.stride(2),
                *col_strides,
                n_q_heads, n_q_heads // n_kv_heads, n_q, n_k, n_programs_m, scale * LOG2E, window,
                HEAD_DIM=head_dim,
                LAYOUT_BLOCK=block_size,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                USE_TMA=use_tma,
                WARP_SPECIALIZE=warp_specialize,
                HAS_COLUMNS=column_args is not None,
                COLUMN_STAGES=COLUMN_STAGES,
                HAS_WINDOW=window > 0,
                num_warps=num_warps,
                num_stages=num_stages,
            )
            break
        except triton.runtime.errors.OutOfResources:
            # GPUs with less shared memory than Hopper (A100: 164 KB): a shallower pipeline.
            if num_stages <= 2:
                raise
            num_stages -= 1
