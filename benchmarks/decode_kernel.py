"""Decode attention benchmark: PyTorch SDPA (one query token vs the whole cache) vs patchattn's Triton
page-sparse decode kernel with full-cache page lists and with ~10% of the pages. GPU only; never part of CI.

    python benchmarks/decode_kernel.py                       # 32K and 128K, batch 1 and 8
    python benchmarks/decode_kernel.py --sweep               # also time launch configs of the kernel

Shapes: Llama-3.1-8B attention, 32 query heads / 8 KV heads, head dim 128, bf16, page size 16 (--page-size).
Cases per (context, batch):
  sdpa   F.scaled_dot_product_attention(q (B, 32, 1, 128), K, V (B, 8, S, 128), enable_gqa=True), default
         dispatch; the CUDA kernels it launched are recorded (torch.profiler) and the explicit backends timed
  full   ours, every page of every KV head (the same arithmetic as SDPA)
  sparse ours, per KV head a budget drawn uniformly from 5-15% of the pages (mean ~10%): 4 sink pages, a window
         of the last 64 pages and random other pages ("top pages" stand-in); lists trimmed to the longest
Bandwidth = (K/V bytes of the tokens actually attended + q + out) / time; the page lists and the split
workspace are not counted. Timings: triton.testing.do_bench medians (L2 flushed between calls), of the eager
call (host overhead included where it exceeds the GPU time) and of a CUDA graph replay of the same call (GPU
time only, as a serving engine runs decode); ``host_us`` is the CPU time of one eager call (GPU kept busy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchattn.kernels.sparse_decode import kernel as K  # noqa: E402
from patchattn.kernels.sparse_decode.naive import sparse_decode_naive  # noqa: E402

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
ELEM_BYTES = 2
DEVICE = "cuda"


def bench(fn, rep_ms=200):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=30, rep=rep_ms, return_mode="median")


def graph_ms(fn):
    """do_bench median of a CUDA graph replay of ``fn`` (None where capture fails)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay)
    except Exception as exc:
        print(f"  graph capture failed: {str(exc)[:200]}", flush=True)
        return None


def host_us(fn, n=40):
    """CPU time of one call while the GPU is busy (launches only queue up)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU spin
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return dt * 1e6


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written: the practical HBM ceiling on this card."""
    x = torch.empty(1 << 30, dtype=torch.int16, device=DEVICE).random_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    del x, y
    return 2 * (1 << 31) / ms * 1e-6


def sdpa_decode(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def sdpa_kernels(q, k, v) -> list[str]:
    """Names of the CUDA kernels one default-dispatch SDPA decode call launches."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            sdpa_decode(q, k, v)
            torch.cuda.synchronize()
        return sorted({e.name[:120] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
    except Exception as exc:  # the profiler is context only
        return [f"profiler failed: {str(exc)[:160]}"]


def sdpa_backends(q, k, v) -> dict[str, float | None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        def fn(backend=getattr(SDPBackend, name)):
            with sdpa_kernel(backend):
                return sdpa_decode(q, k, v)

        try:
            times[name.lower()] = bench(fn)
        except Exception as exc:
            times[name.lower()] = None
            print(f"  SDPA {name} failed: {str(exc)[:160]}", flush=True)
    return times


def full_pages(batch, s, page_size):
    n_pages = triton.cdiv(s, page_size)
    ids = torch.arange(n_pages, dtype=torch.int32, device=DEVICE).expand(batch, HKV, n_pages).contiguous()
    return ids, torch.full((batch, HKV), n_pages, dtype=torch.int32, device=DEVICE)


def sparse_pages(batch, s, page_size, gen, sink_pages=4, window_pages=64, lo=0.05, hi=0.15):
    """Per KV head: sink + window + random pages up to a budget drawn from [lo, hi] of the pages."""
    n_pages = triton.cdiv(s, page_size)
    fixed = torch.zeros(n_pages, dtype=torch.bool)
    fixed[:sink_pages] = True
    fixed[-window_pages:] = True
    lists = []
    for _ in range(batch * HKV):
        budget = int(n_pages * (lo + (hi - lo) * torch.rand(1, generator=gen).item()))
        keep = fixed.clone()
        others = (~fixed).nonzero()[:, 0]
        extra = max(budget - int(fixed.sum()), 0)
        keep[others[torch.randperm(len(others), generator=gen)[:extra]]] = True
        lists.append(keep.nonzero()[:, 0])
    max_count = max(len(x) for x in lists)
    ids = torch.zeros(batch * HKV, max_count, dtype=torch.int32)
    counts = torch.zeros(batch * HKV, dtype=torch.int32)
    for i, x in enumerate(lists):
        ids[i, : len(x)] = x.to(torch.int32)
        counts[i] = len(x)
    return ids.view(batch, HKV, max_count).to(DEVICE), counts.view(batch, HKV).to(DEVICE)


def attended_tokens(counts, page_size, s) -> int:
    return min(int(counts.sum().item()) * page_size, counts.numel() * s)  # lists end at the (full) last page


def bytes_moved(tokens: int, batch: int) -> int:
    return 2 * tokens * D * ELEM_BYTES + 2 * batch * HQ * D * ELEM_BYTES


SWEEP = [  # (programs_per_sm, block_n, num_warps, num_stages, combine); timed as CUDA graph replays
    (1, 64, 4, 3, "triton"), (2, 64, 4, 3, "triton"), (4, 64, 4, 3, "triton"), (8, 64, 4, 3, "triton"),
    (4, 64, 4, 2, "triton"), (4, 64, 4, 4, "triton"), (4, 64, 8, 3, "triton"), (4, 32, 4, 4, "triton"),
    (2, 128, 4, 3, "triton"), (4, 128, 4, 3, "triton"), (2, 128, 8, 3, "triton"), (4, 128, 8, 3, "triton"), (8, 128, 8, 3, "triton"),
    (4, 64, 4, 3, "torch"),
]


def run_sweep(q, k, v, ids, counts, lens, page_size, nbytes, label):
    rows = []
    for pps, bn, w, st, comb in SWEEP:
        cfg = dict(programs_per_sm=pps, block_n=bn, num_warps=w, num_stages=st, combine=comb)
        try:
            ms = graph_ms(lambda: K.sparse_decode_triton(q, k, v, ids, counts, lens, page_size, **cfg))
            rows.append(dict(case=label, page_size=page_size, **cfg, ms=ms, gbs=nbytes / ms * 1e-6))
        except Exception as exc:
            rows.append(dict(case=label, page_size=page_size, **cfg, error=str(exc)[:200]))
        print(f"  sweep {label} {rows[-1]}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="time launch configs (graph replays) on both list kinds")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/decode_kernel.json)")
    args = ap.parse_args()
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "decode_kernel.json")
    ps = args.page_size
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    meta = dict(
        date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(), sms=props.multi_processor_count,
        torch=torch.__version__, triton=triton.__version__, shape=dict(Hq=HQ, Hkv=HKV, D=D, dtype=str(DTYPE), page_size=ps),
        kernel_configs={str(d): c for d, c in K.CONFIGS.items()}, target_programs_per_sm=K.TARGET_PROGRAMS_PER_SM,
        min_tiles_per_split=K.MIN_TILES_PER_SPLIT, copy_gbs=copy_bandwidth_gbs(),
    )
    print(json.dumps(meta), flush=True)
    rows, sweep = [], []
    for s in args.contexts:
        for batch in args.batches:
            q = torch.randn(batch, HQ, D, device=DEVICE, dtype=DTYPE)
            k = torch.randn(batch, HKV, s, D, device=DEVICE, dtype=DTYPE)
            v = torch.randn(batch, HKV, s, D, device=DEVICE, dtype=DTYPE)
            lens = torch.full((batch,), s, dtype=torch.int32, device=DEVICE)
            row = dict(context=s, batch=batch)
            full_bytes = bytes_moved(batch * HKV * s, batch)
            row["sdpa_ms"] = bench(lambda: sdpa_decode(q, k, v))
            row["sdpa_gbs"] = full_bytes / row["sdpa_ms"] * 1e-6
            row["sdpa_kernels"] = sdpa_kernels(q, k, v)
            row["sdpa_backends_ms"] = sdpa_backends(q, k, v)
            row["sdpa_graph_ms"] = graph_ms(lambda: sdpa_decode(q, k, v))
            row["sdpa_host_us"] = host_us(lambda: sdpa_decode(q, k, v))
            ref = sdpa_decode(q, k, v)

            ids, counts = full_pages(batch, s, ps)
            splits, tiles = K.choose_splits(batch * HKV, triton.cdiv(ids.shape[-1] * ps, max(K.CONFIGS[D][0], ps)), meta["sms"])
            row.update(full_splits=splits, full_tiles_per_split=tiles)
            row["full_ms"] = bench(lambda: K.sparse_decode_triton(q, k, v, ids, counts, lens, ps))
            row["full_gbs"] = full_bytes / row["full_ms"] * 1e-6
            row["full_bw_vs_sdpa"] = row["full_gbs"] / row["sdpa_gbs"]
            row["full_graph_ms"] = graph_ms(lambda: K.sparse_decode_triton(q, k, v, ids, counts, lens, ps))
            row["ours_host_us"] = host_us(lambda: K.sparse_decode_triton(q, k, v, ids, counts, lens, ps))
            row["full_rel_err_vs_sdpa"] = rel_err(K.sparse_decode_triton(q, k, v, ids, counts, lens, ps), ref)
            if args.sweep:
                sweep += run_sweep(q, k, v, ids, counts, lens, ps, full_bytes, f"full {s // 1024}K B={batch}")
            del ids, counts

            ids, counts = sparse_pages(batch, s, ps, gen)
            tokens = attended_tokens(counts, ps, s)
            sparse_bytes = bytes_moved(tokens, batch)
            row.update(sparse_fraction=tokens / (batch * HKV * s), sparse_max_pages=ids.shape[-1])
            row["sparse_ms"] = bench(lambda: K.sparse_decode_triton(q, k, v, ids, counts, lens, ps))
            row["sparse_gbs"] = sparse_bytes / row["sparse_ms"] * 1e-6
            row["sparse_speedup_vs_sdpa"] = row["sdpa_ms"] / row["sparse_ms"]
            row["sparse_graph_ms"] = graph_ms(lambda: K.sparse_decode_triton(q, k, v, ids, counts, lens, ps))
            if args.sweep:
                sweep += run_sweep(q, k, v, ids, counts, lens, ps, sparse_bytes, f"10% {s // 1024}K B={batch}")
            row["sparse_rel_err_vs_naive"] = rel_err(
                K.sparse_decode_triton(q, k, v, ids, counts, lens, ps), sparse_decode_naive(q, k, v, ids, counts, lens, ps)
            )
            rows.append(row)
            print(json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()}), flush=True)
            del q, k, v, ref, ids, counts
            torch.cuda.empty_cache()
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(dict(meta=meta, rows=rows, sweep=sweep), indent=1))

    if sweep:
        print("\n| sweep case (graph) | progs/SM | BLOCK_N | warps | stages | combine | ms | GB/s |\n|---|---|---|---|---|---|---|---|")
        for r in sweep:
            ms = r.get("ms") or float("nan")
            print(f"| {r['case']} | {r['programs_per_sm']} | {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['combine']} | "
                  f"{ms:.4f} | {r.get('gbs') or float('nan'):.0f} |")
    for r in rows:
        print(f"SDPA {r['context'] // 1024}K B={r['batch']}: kernels {r['sdpa_kernels']}; explicit backends ms {r['sdpa_backends_ms']}")
    print(f"\n{meta['date']} {meta['device']} torch {meta['torch']} triton {meta['triton']}; Hq={HQ} Hkv={HKV} D={D} bf16 page={ps}; "
          f"copy {meta['copy_gbs']:.0f} GB/s; configs {meta['kernel_configs']}, {meta['target_programs_per_sm']} programs/SM")
    print("eager do_bench (host overhead included where it exceeds the GPU time):")
    print("| context | B | SDPA ms | SDPA GB/s | full ms | full GB/s | full/SDPA BW | 10% frac | 10% ms | 10% GB/s | 10% vs SDPA | host us SDPA / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context'] // 1024}K | {r['batch']} | {r['sdpa_ms']:.3f} | {r['sdpa_gbs']:.0f} | {r['full_ms']:.3f} | {r['full_gbs']:.0f} | "
              f"{r['full_bw_vs_sdpa']:.2f} | {r['sparse_fraction']:.3f} | {r['sparse_ms']:.3f} | {r['sparse_gbs']:.0f} | "
              f"{r['sparse_speedup_vs_sdpa']:.2f}x | {r['sdpa_host_us']:.0f} / {r['ours_host_us']:.0f} |")
    print("CUDA graph replay (GPU time):")
    print("| context | B | SDPA ms | SDPA GB/s | full ms | full GB/s | full/SDPA BW | 10% ms | 10% GB/s | 10% vs SDPA | err full vs SDPA / 10% vs ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        full_bytes = r["full_gbs"] * r["full_ms"]
        sparse_bytes = r["sparse_gbs"] * r["sparse_ms"]
        sg, fg, pg = (r.get(x) or nan for x in ("sdpa_graph_ms", "full_graph_ms", "sparse_graph_ms"))
        print(f"| {r['context'] // 1024}K | {r['batch']} | {sg:.4f} | {full_bytes / sg:.0f} | {fg:.4f} | {full_bytes / fg:.0f} | {sg / fg:.2f} | "
              f"{pg:.4f} | {sparse_bytes / pg:.0f} | {sg / pg:.2f}x | {r['full_rel_err_vs_sdpa']:.1e} / {r['sparse_rel_err_vs_naive']:.1e} |")


if __name__ == "__main__":
    main()
