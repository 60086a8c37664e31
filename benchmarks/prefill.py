"""Prefill attention benchmark: PyTorch SDPA (dense causal, flash backend) vs FlexAttention vs patchattn's
Triton block-sparse kernel. GPU only; never part of CI.

    python benchmarks/prefill.py --n 8192 32768 131072 --out results.json
    python benchmarks/prefill.py --n 32768 --cases dense --sweep      # also time kernel launch configs

Shapes: B=1, 32 query heads / 8 KV heads, head dim 128, bf16, block size 128 (Llama-3.1-8B prefill).
"ours" is what the patched model runs, patchattn.kernels.sparse_prefill's pick: on Hopper at block size 128 the
warp-specialised Gluon kernel (sparse_prefill/hopper.py; the row's "kernel"), whose Triton counterpart is timed too.
Cases, each one block layout used by both Flex (through create_block_mask) and our kernel:
  dense      every causal block
  streaming  sink 128 + window 4096 tokens (patchattn.strategies Streaming)
  vs10, vs5  vertical-slash at ~10% / ~5% block density (patchattn.strategies VerticalSlash)
  topk10, topk5  block top-k at ~10% / ~5% (patchattn.strategies BlockTopK)
  vst10, vst5  token-granular vertical-slash at ~10% / ~5% (VerticalSlashTokens: diagonal blocks plus single key
             columns, gathered bs at a time; density counts the column tiles). Flex gets the same token-level mask
             (its block mask marks every block holding a column as partial, so it computes those blocks whole)
For the data-dependent cases the layout is estimated from the (random) q/k, and our time INCLUDES building
it (strategy estimate + layout + finalize_ragged, as the patched model does); the build time is also reported on its own. Flex gets the finished
block mask for free (its create_block_mask time is not counted). The strategy budgets are picked per N by a
search on the same inputs so the density lands near the target; the achieved density is reported.

TFLOP/s count computed blocks only: 4 * B * Hq * D * bs * bs * (kept block pairs - diagonal blocks / 2);
SDPA is credited with the dense causal count. Timings are triton.testing.do_bench medians (warm-up
excluded, L2 flushed between calls). Correctness in the same run, at the smallest N: ours vs SDPA (dense)
and ours vs Flex (sparse cases), relative Frobenius error.
"""

from __future__ import annotations

import argparse
import warnings
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchattn.kernels.sparse_prefill.kernel import CONFIGS, USE_TMA, sparse_prefill_triton  # noqa: E402
from patchattn.kernels import finalize_ragged, prefill_kernel, sparse_prefill  # noqa: E402
from patchattn.layout import block_density, causal_blocks, column_counts, column_tiles, finalize, num_blocks, to_ragged  # noqa: E402

B, HQ, HKV, D, BS = 1, 32, 8, 128, 128
DTYPE = torch.bfloat16
ALL_CASES = ["dense", "streaming", "vs10", "vs5", "topk10", "topk5", "vst10", "vst5"]
TOKEN_CASES = {"vst10": 0.10, "vst5": 0.05}


def bench(fn, rep_ms=300):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def flops_of(counts: torch.Tensor) -> float:
    """counts: (B, Hq, n_q_blocks), so the sum already runs over batch and heads."""
    pairs = counts.sum().item() - counts.numel() / 2  # the diagonal block is half computed
    return 4.0 * D * BS * BS * pairs


# ------------------------------------------------------------------------------------------ baselines
def make_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def with_gqa(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def with_repeat(q, k, v):
        g = q.shape[1] // k.shape[1]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True
            )

    q = torch.randn(1, 4, 256, 128, device="cuda", dtype=DTYPE)
    k = torch.randn(1, 1, 256, 128, device="cuda", dtype=DTYPE)
    try:
        with_gqa(q, k, k)
        return with_gqa, "flash backend, enable_gqa=True (no K/V copy)"
    except Exception as exc:  # older torch: the flash backend has no GQA
        print(f"SDPA flash + enable_gqa failed ({exc}); using repeat_interleave", flush=True)
        return with_repeat, "flash backend, K/V repeat_interleave'd to 32 heads inside the timed call"


def other_sdpa():
    """For context only: SDPA's default dispatch and the cuDNN backend (each None where it fails)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def default(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def cudnn(q, k, v):
        g = q.shape[1] // k.shape[1]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True
            )

    return {"sdpa_default": default, "sdpa_cudnn_repeat": cudnn}


def make_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def block_mask_of(keep: torch.Tensor, n: int):
        def mask_mod(b, h, q_idx, kv_idx):
            return keep[b, h, q_idx // BS, kv_idx // BS] & (kv_idx <= q_idx)

        return create_block_mask(mask_mod, keep.shape[0], keep.shape[1], n, n, device="cuda", BLOCK_SIZE=BS, _compile=True)

    def run(q, k, v, block_mask):
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    return run, block_mask_of


def make_flex_columns():
    """Flex with a token-level mask: the blocks plus each row's columns (a (B, H, N) bool of column positions; row
    block i reads the columns before its first token)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def block_mask_of(keep: torch.Tensor, colmask: torch.Tensor, n: int):
        def mask_mod(b, h, q_idx, kv_idx):
            in_col = colmask[b, h, kv_idx] & (kv_idx < (q_idx // BS) * BS) & (q_idx // BS < keep.shape[-2] - 1)
            return (keep[b, h, q_idx // BS, kv_idx // BS] | in_col) & (kv_idx <= q_idx)

        return create_block_mask(mask_mod, keep.shape[0], keep.shape[1], n, n, device="cuda", BLOCK_SIZE=BS, _compile=True)

    return block_mask_of


def token_case(case: str, q, k, n: int):
    """The token-granular vertical-slash budget (vertical tokens = slash tokens) whose density, column tiles counted,
    first reaches the target; returns build() -> (raw keep, columns) and the strategy."""
    from patchattn.strategies import get_strategy

    target = TOKEN_CASES[case]
    nb = num_blocks(n, BS)
    causal = nb * (nb + 1) / 2
    est = get_strategy("vertical_slash_tokens").estimate(q, k, BS)
    best = None
    for blocks in range(1, nb):
        s = get_strategy("vertical_slash_tokens", vertical_tokens=blocks * BS, slash_tokens=blocks * BS)
        keep = finalize(s.layout(est))
        tiles = column_tiles(column_counts(s.columns(est), nb, BS), BS).sum(-1)
        dens = (block_density(keep) + tiles / causal).mean().item()
        best = s
        if dens >= target:
            break
    del est, keep
    torch.cuda.empty_cache()

    def build():
        est = best.estimate(q, k, BS)
        return best.layout(est), best.columns(est)

    build.strategy = best
    return build, f"{best.name}{best.params()}"


def run_token_case(case, q, k, v, n, flex, row):
    """Our time includes the estimate, the layout, its finishing and the column counts, as the patched model runs."""
    build, desc = token_case(case, q, k, n)
    raw, cols = build()
    counts, ids, fill = finalize_ragged(raw)
    col_counts = column_counts(cols, counts.shape[-1], BS)
    tiles = column_tiles(col_counts, BS)
    nb = counts.shape[-1]
    keep = finalize(raw)
    row.update(layout=desc, density=((block_density(keep) + tiles.sum(-1) / (nb * (nb + 1) / 2)).mean().item()),
               block_density=block_density(keep).mean().item(), columns_max=int((cols < n).sum(-1).max()), causal_density=fill)
    flops = flops_of(counts) + 4.0 * D * BS * BS * tiles.sum().item()

    def kernel():
        return sparse_prefill_triton(q, k, v, counts, ids, BS, density=fill, columns=cols, column_counts=col_counts, column_keep=raw)

    def ours():
        r, c = build()
        cc, ii, f = finalize_ragged(r)
        return sparse_prefill_triton(q, k, v, cc, ii, BS, density=f, columns=c, column_counts=column_counts(c, cc.shape[-1], BS), column_keep=r)

    row["kernel_ms"] = bench(kernel)
    row["index_ms"] = bench(lambda: (lambda r, c: (finalize_ragged(r), column_counts(c, nb, BS)))(*build()), rep_ms=200)
    row["ours_ms"] = bench(ours)
    row["ours_includes_index"] = True
    row["ours_tflops"] = flops / row["kernel_ms"] * 1e-9
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["ours_ms"]
    out = kernel()
    if flex is not None:
        run, _ = flex
        colmask = torch.zeros(B, HQ, n + 1, dtype=torch.bool, device="cuda").scatter_(-1, cols.long(), True)[..., :n]
        bm = make_flex_columns()(keep, colmask, n)
        row["flex_ms"] = bench(lambda: run(q, k, v, bm))
        row["flex_tflops"] = flops / row["flex_ms"] * 1e-9
        row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
        row["rel_err_vs_flex"] = rel_err(out, run(q, k, v, bm))
        del bm, colmask
    return row


# --------------------------------------------------------------------------------------------- layouts
def expand_kv_heads(k):
    return k[:, torch.arange(HQ, device=k.device) // (HQ // HKV)]


def strategy_case(case: str, q, k, n: int):
    """(builder, description): builder() -> keep, the timed layout construction of a data-dependent case."""
    from patchattn.strategies import get_strategy

    target = {"vs10": 0.10, "vs5": 0.05, "topk10": 0.10, "topk5": 0.05}[case]
    k_exp = expand_kv_heads(k)
    if case.startswith("vs"):
        strat0 = get_strategy("vertical_slash")
        est = strat0.estimate(q, k_exp, BS)
        best = None
        for blocks in range(1, num_blocks(n, BS)):  # vertical = slash budget; first one at/above target
            s = get_strategy("vertical_slash", vertical_tokens=blocks * BS, slash_tokens=blocks * BS)
            dens = block_density(s.layout(est) & causal_blocks(est.n_blocks, q.device)).mean().item()
            best = s
            if dens >= target:
                break
        del est
    else:
        strat0 = get_strategy("block_topk")
        est = strat0.estimate(q, k_exp, BS)
        lo, hi = 1e-4, 1.0
        for _ in range(30):  # bisect the mass threshold onto the target density
            mid = (lo + hi) / 2
            dens = block_density(get_strategy("block_topk", threshold=mid).layout(est)).mean().item()
            lo, hi = (mid, hi) if dens < target else (lo, mid)
        best = get_strategy("block_topk", threshold=hi)
        del est
    del k_exp
    torch.cuda.empty_cache()

    def build():  # the model path: GQA keys unexpanded, the raw layout (finished with the indices, below)
        return best.layout(best.estimate(q, k, BS))

    build.strategy = best
    return build, f"{best.name}{best.params()}"


def synthetic_case(case: str, n: int, gen: torch.Generator):
    """Fallback when patchattn.strategies is missing: random columns + diagonals, or random blocks."""
    nb = num_blocks(n, BS)
    target = {"vs10": 0.10, "vs5": 0.05, "topk10": 0.10, "topk5": 0.05}[case]
    qb = torch.arange(nb, device="cuda")[:, None]
    kb = torch.arange(nb, device="cuda")[None, :]
    causal = qb >= kb
    if case.startswith("vs"):
        n_sel = max(1, int(target * nb / 3))
        cols = torch.rand(B, HQ, nb, device="cuda", generator=gen).topk(n_sel, -1).indices
        diags = torch.rand(B, HQ, nb, device="cuda", generator=gen).topk(n_sel, -1).indices
        keep = torch.zeros(B, HQ, nb, nb, dtype=torch.bool, device="cuda")
        keep.scatter_(-1, cols[:, :, None, :].expand(-1, -1, nb, -1), True)
        keep |= (((qb - kb)[None, None, :, :, None] == diags[:, :, None, None, :]).any(-1))
    else:
        keep = torch.rand(B, HQ, nb, nb, device="cuda", generator=gen) < target
    keep[..., 0] = True
    keep = (keep & causal) | torch.eye(nb, dtype=torch.bool, device="cuda")
    return (lambda: keep), "synthetic"


def static_layout(case: str, n: int) -> torch.Tensor:
    nb = num_blocks(n, BS)
    qb = torch.arange(nb, device="cuda")[:, None]
    kb = torch.arange(nb, device="cuda")[None, :]
    if case == "dense":
        keep = qb >= kb
    else:  # streaming: the Streaming strategy's own layout, sink 128 + window 4096 tokens
        from patchattn.strategies import get_strategy
        from patchattn.strategies.base import Estimate

        est = Estimate(B, HQ, n, BS, torch.device("cuda"))
        return get_strategy("streaming", sink_tokens=128, window_tokens=4096).layout(est).__and__(qb >= kb).contiguous()
    return keep.expand(B, HQ, nb, nb).contiguous()


# ------------------------------------------------------------------------------------------------ main
def run_sweep(q, k, v, counts, ids, n, configs, case="dense"):
    rows = []
    ref = sparse_prefill_triton(q, k, v, counts, ids, BS)
    for block_m, block_n, warps, stages, tma, *ws in configs:
        ws = bool(ws and ws[0])
        fn = lambda: sparse_prefill_triton(  # noqa: E731
            q, k, v, counts, ids, BS, block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
            use_tma=bool(tma), warp_specialize=ws,
        )
        row = dict(case=case, n=n, block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages, tma=bool(tma), warp_specialize=ws)
        try:
            out = fn()
            if ref is not None:
                row["rel_err_vs_default"] = rel_err(out, ref)
            ms = bench(fn)
            row.update(ms=ms, tflops=flops_of(counts) / ms * 1e-9)
        except Exception as exc:  # e.g. out of shared memory
            row.update(error=str(exc)[:300])
        rows.append(row)
        print(f"  sweep {row}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--cases", nargs="+", default=ALL_CASES, choices=ALL_CASES)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-other-sdpa", action="store_true", help="skip SDPA default / cuDNN context timings")
    ap.add_argument("--block-size", type=int, default=128, choices=[64, 128])
    ap.add_argument("--sweep", action="store_true", help="time launch configs (on the --sweep-cases layouts)")
    ap.add_argument("--sweep-cases", nargs="*", default=["dense"], help="cases whose layout the sweep times")
    ap.add_argument("--sweep-n", type=int, nargs="*", default=None, help="sweep only at these N (default: all)")
    ap.add_argument("--sweep-configs", default="64,64,4,5,1;64,64,4,4,1;64,128,4,3,1;64,64,4,5,0;128,128,8,3,1;64,64,4,6,1",
                    help="BLOCK_M,BLOCK_N,num_warps,num_stages,tma[,warp_specialize];...")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/prefill.json)")
    args = ap.parse_args()
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "prefill.json")
    global BS
    BS = args.block_size

    warnings.filterwarnings("ignore", message="_compile flag on create_block_mask")
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    sdpa, sdpa_desc = make_sdpa()
    flex, block_mask_of = (None, None) if args.no_flex else make_flex()
    try:
        import patchattn.strategies  # noqa: F401

        have_strategies = True
    except ImportError:
        have_strategies = False

    meta = dict(
        date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        shape=dict(B=B, Hq=HQ, Hkv=HKV, D=D, dtype=str(DTYPE), block_size=BS),
        flops="4*D*bs^2*(sum of kept block pairs over B,H - diagonal/2); SDPA: dense causal count",
        sdpa=sdpa_desc,
        kernel_configs={f"d{d}_bs{b}": v for (d, b), v in CONFIGS.items()},
        kernel_use_tma_default=USE_TMA,
        layouts="patchattn.strategies" if have_strategies else "synthetic",
    )
    print(json.dumps(meta), flush=True)
    rows, sweep = [], []
    check_n = min(args.n)
    for n in args.n:
        q = torch.randn(B, HQ, n, D, device="cuda", dtype=DTYPE, generator=gen)
        k = torch.randn(B, HKV, n, D, device="cuda", dtype=DTYPE, generator=gen)
        v = torch.randn(B, HKV, n, D, device="cuda", dtype=DTYPE, generator=gen)
        t0 = time.time()
        sdpa_ms = bench(lambda: sdpa(q, k, v))
        dense_flops = 4.0 * B * HQ * D * BS * BS * (num_blocks(n, BS) * (num_blocks(n, BS) + 1) / 2 - num_blocks(n, BS) / 2)
        print(f"N={n}: SDPA {sdpa_ms:.2f} ms ({time.time() - t0:.0f}s)", flush=True)
        sdpa_ref = sdpa(q, k, v) if n == check_n else None
        extra = {}
        for name, fn in ({} if args.no_other_sdpa else other_sdpa()).items():
            try:
                extra[f"{name}_ms"] = bench(lambda: fn(q, k, v))
            except Exception as exc:
                extra[f"{name}_ms"] = None
                print(f"  {name} failed: {str(exc)[:200]}", flush=True)
        print(f"  other SDPA: {extra}", flush=True)
        for case in args.cases:
            t0 = time.time()
            row = dict(case=case, n=n, sdpa_ms=sdpa_ms, sdpa_tflops=dense_flops / sdpa_ms * 1e-9, **extra)
            if case in TOKEN_CASES:
                if have_strategies:
                    rows.append(run_token_case(case, q, k, v, n, None if flex is None else (flex, block_mask_of), row))
                    print(f"  {case}: {json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()})} ({time.time() - t0:.0f}s)", flush=True)
                torch.cuda.empty_cache()
                continue
            if case in ("dense", "streaming"):  # finalized as the model runs it (streaming: the last row reads all)
                keep = finalize(static_layout(case, n))
                build, desc = None, "static"
            elif have_strategies:
                build, desc = strategy_case(case, q, k, n)
                keep = finalize(build())
            else:
                build, desc = synthetic_case(case, n, gen)
                keep = finalize(build())
            counts, ids, fill = finalize_ragged(keep)  # what the patched model runs: one Triton launch
            row.update(layout=desc, density=block_density(keep).mean().item(), max_count=ids.shape[-1], causal_density=fill)
            flops = flops_of(counts)
            row["index_ms"] = bench(lambda: finalize_ragged(build() if build else keep), rep_ms=200)
            # ours: what the patched model runs (sparse_prefill's pick: the Gluon kernel on Hopper at block 128)
            row["kernel"] = prefill_kernel(q, k, v, BS)
            kernel_ms = bench(lambda: sparse_prefill(q, k, v, counts, ids, BS, density=fill, backend="triton"))
            row["kernel_ms"] = kernel_ms
            if row["kernel"] != "triton":  # the plain Triton kernel on the same layout, for comparison
                row["triton_kernel_ms"] = bench(lambda: sparse_prefill_triton(q, k, v, counts, ids, BS, density=fill))
            if hasattr(build, "strategy"):  # where the index-building time goes
                strat = build.strategy
                row["estimate_ms"] = bench(lambda: strat.estimate(q, k, BS), rep_ms=200)
                est = strat.estimate(q, k, BS)
                raw = strat.layout(est)
                row["layout_ms"] = bench(lambda: strat.layout(est), rep_ms=200)
                row["to_indices_ms"] = bench(lambda: finalize_ragged(raw), rep_ms=200)  # finalize + compaction, fused
                row["to_indices_torch_ms"] = bench(lambda: to_ragged(finalize(raw)), rep_ms=200)
                del est
            if build is not None and desc != "synthetic":  # data-dependent: our time includes building the layout
                def ours():
                    c, i, f = finalize_ragged(build())
                    return sparse_prefill(q, k, v, c, i, BS, density=f, backend="triton")

                row["ours_ms"] = bench(ours)
                row["ours_includes_index"] = True
            else:
                row["ours_ms"] = kernel_ms
                row["ours_includes_index"] = False
            row["ours_tflops"] = flops / kernel_ms * 1e-9  # kernel only
            row["speedup_vs_sdpa"] = sdpa_ms / row["ours_ms"]
            out = sparse_prefill(q, k, v, counts, ids, BS, density=fill, backend="triton")
            if case == "dense" and sdpa_ref is not None:
                row["rel_err_vs_sdpa"] = rel_err(out, sdpa_ref)
            if flex is not None:
                bm = block_mask_of(keep, n)
                row["flex_ms"] = bench(lambda: flex(q, k, v, bm))
                row["flex_tflops"] = flops / row["flex_ms"] * 1e-9
                row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
                if n == check_n:
                    row["rel_err_vs_flex"] = rel_err(out, flex(q, k, v, bm))
                del bm
            rows.append(row)
            print(f"  {case}: {json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()})} ({time.time() - t0:.0f}s)", flush=True)
            if args.sweep and case in args.sweep_cases and (not args.sweep_n or n in args.sweep_n):
                configs = [tuple(int(x) for x in c.split(",")) for c in args.sweep_configs.split(";")]
                sweep += run_sweep(q, k, v, counts, ids, n, configs, case)
            del keep, counts, ids, out
            torch.cuda.empty_cache()
        del q, k, v, sdpa_ref
        torch.cuda.empty_cache()
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(dict(meta=meta, rows=rows, sweep=sweep), indent=1))

    if sweep:
        print("\n| sweep case | N | BLOCK_M | BLOCK_N | warps | stages | TMA | WS | ms | TF/s | rel err vs default cfg |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sweep:
            print(f"| {r['case']} | {r['n']} | {r['block_m']} | {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['tma']} | "
                  f"{r['warp_specialize']} | "
                  f"{r.get('ms', math.nan):.2f} | {r.get('tflops', math.nan):.0f} | {r.get('rel_err_vs_default', r.get('error', ''))} |")
    print_table(rows, meta)
    ctx = sorted({(r["n"], r.get("sdpa_default_ms"), r.get("sdpa_cudnn_repeat_ms")) for r in rows})
    for n, d_ms, c_ms in ctx:
        print(f"SDPA context N={n}: flash {[r['sdpa_ms'] for r in rows if r['n'] == n][0]:.2f} ms, default dispatch {d_ms} ms, cuDNN (repeat_interleave) {c_ms} ms")


def print_table(rows, meta):
    print(f"\n{meta['date']} {meta['device']} torch {meta['torch']} triton {meta['triton']}; "
          f"B={B} Hq={HQ} Hkv={HKV} D={D} bf16 bs={BS}; SDPA: {meta['sdpa']}; SDPA default: its default dispatch (cuDNN)")
    hdr = ("| case | N | density | kernel | SDPA ms | SDPA default ms | Flex ms | ours ms (index ms) | Triton kernel ms | SDPA TF/s | "
           "Flex TF/s | ours kernel TF/s | vs SDPA | vs SDPA default | vs Flex | rel err |")
    print(hdr)
    print("|---" * (hdr.count("|") - 1) + "|")
    for r in rows:
        err = r.get("rel_err_vs_sdpa", r.get("rel_err_vs_flex"))
        ours = f"{r['ours_ms']:.2f}" + (f" (incl. {r['index_ms']:.2f})" if r["ours_includes_index"] else f" (+{r['index_ms']:.2f})")
        default = r.get("sdpa_default_ms") or math.nan
        print(
            f"| {r['case']} | {r['n'] // 1024}K | {r['density']:.3f} | {r.get('kernel', 'triton')} | {r['sdpa_ms']:.2f} | {default:.2f} | "
            f"{r.get('flex_ms', math.nan):.2f} | {ours} | {r.get('triton_kernel_ms', r.get('kernel_ms', math.nan)):.2f} | "
            f"{r['sdpa_tflops']:.0f} | {r.get('flex_tflops', math.nan):.0f} | {r['ours_tflops']:.0f} | {r['speedup_vs_sdpa']:.2f}x | "
            f"{default / r['ours_ms']:.2f}x | {r.get('speedup_vs_flex', math.nan):.2f}x | {'' if err is None else f'{err:.1e}'} |"
        )


if __name__ == "__main__":
    main()
