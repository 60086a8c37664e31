"""A model's own sliding window in prefill: patchattn's kernel over the blocks the window reaches vs what
transformers' SDPA path computes (SDPA with the window as a boolean mask), FlexAttention with a sliding-window
mask_mod, and dense causal SDPA (flash backend: the cost of ignoring the window). GPU only; never part of CI.

    python benchmarks/prefill_window.py --out prefill_window.json

Shapes (B=1, bf16): Gemma 3 270M's sliding layers (4 query / 1 KV head, d=256, window 512) and a Mistral-7B-v0.1
style layer (32 / 8 heads, d=128, window 4096). "ours" includes finishing the window layout (one launch), as the
patched model does on a shape's first call; "kernel" is what it runs after (the layout is kept per shape), and the
ratios are taken against it. Flex gets its block mask for free. TFLOP/s count the blocks computed:
4 * B * Hq * D * bs^2 * (kept block pairs - diagonal blocks / 2). Correctness in the same run: ours vs SDPA with
the mask (relative Frobenius error).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefill import bench, rel_err  # noqa: E402 (the prefill benchmark's timing and error, shared)
from patchattn.kernels import finalize_ragged, prefill_kernel, sparse_prefill  # noqa: E402
from patchattn.layout import num_blocks, window_blocks  # noqa: E402

SHAPES = {
    "gemma3-270m": dict(hq=4, hkv=1, d=256, window=512),
    "mistral-7b-v0.1": dict(hq=32, hkv=8, d=128, window=4096),
}


SWEEP = [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for st in (1, 2, 3)]


def run_one(name, n, bs, hq, hkv, d, window, flex_ok=True, sweep=False):
    gen = torch.Generator(device="cuda").manual_seed(n + d)
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    n_blk, rows = num_blocks(n, bs), window_blocks(window, bs)
    every = torch.ones(1, 1, n_blk, n_blk, dtype=torch.bool, device="cuda").expand(1, hq, -1, -1)

    def ours():
        counts, ids, density = finalize_ragged(every, window_rows=rows)
        return sparse_prefill(q, k, v, counts, ids, bs, density=density, window=window)

    counts, ids, density = finalize_ragged(every, window_rows=rows)
    flops = 4.0 * d * bs * bs * (counts.sum().item() - counts.numel() / 2)
    row = dict(shape=name, n=n, block_size=bs, hq=hq, hkv=hkv, d=d, window=window, kernel=prefill_kernel(q, k, v, bs, window=window))
    row["ours_ms"] = bench(ours)
    row["ours_tflops"] = flops / row["ours_ms"] / 1e9
    # the patched model keeps a window's finished layout per shape (patch._window_layout): the kernel alone
    row["kernel_ms"] = bench(lambda: sparse_prefill(q, k, v, counts, ids, bs, density=density, window=window))
    row["kernel_tflops"] = flops / row["kernel_ms"] / 1e9
    if sweep:
        from patchattn.kernels.sparse_prefill.kernel import sparse_prefill_triton

        row["sweep"] = {}
        for bm, bn, w, st in SWEEP:
            if bs % bm or bs % bn:
                continue
            try:
                ms = bench(lambda: sparse_prefill_triton(q, k, v, counts, ids, bs, block_m=bm, block_n=bn, num_warps=w, num_stages=st, window=window), rep_ms=100)
                row["sweep"][f"{bm}x{bn}w{w}s{st}"] = round(ms, 4)
            except Exception as exc:  # noqa: BLE001 (out of resources)
                row["sweep"][f"{bm}x{bn}w{w}s{st}"] = type(exc).__name__
    pos = torch.arange(n, device="cuda")
    mask = ((pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window))[None, None]
    g = hq // hkv
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sdpa_masked = lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)  # noqa: E731
    ref = sdpa_masked()
    row["rel_err_vs_sdpa_mask"] = rel_err(ours(), ref)
    row["sdpa_mask_ms"] = bench(sdpa_masked)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def causal():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        row["sdpa_causal_flash_ms"] = bench(causal)
    except Exception as exc:  # noqa: BLE001
        row["sdpa_causal_flash_error"] = str(exc)[:200]
    if flex_ok:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention, dynamic=False)

            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

            block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda", BLOCK_SIZE=128, _compile=True)
            flex_run = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)  # noqa: E731
            row["rel_err_flex_vs_ours"] = rel_err(flex_run(), ours())
            row["flex_ms"] = bench(flex_run)
        except Exception as exc:  # noqa: BLE001
            row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    # ratios for what the patched model runs per call: the kernel (its window layout is kept per shape)
    row["vs_sdpa_mask"] = row["sdpa_mask_ms"] / row["kernel_ms"]
    if "flex_ms" in row:
        row["vs_flex"] = row["flex_ms"] / row["kernel_ms"]
    if "sdpa_causal_flash_ms" in row:
        row["vs_sdpa_causal"] = row["sdpa_causal_flash_ms"] / row["kernel_ms"]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--block-size", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--out", default="prefill_window.json")
    ap.add_argument("--sweep", action="store_true", help="also time the Triton kernel's launch configurations")
    args = ap.parse_args()
    rows = []
    for name in args.shapes:
        for n in args.n:
            for bs in args.block_size:
                try:
                    row = run_one(name, n, bs, **SHAPES[name], sweep=args.sweep)
                except Exception as exc:  # noqa: BLE001
                    row = dict(shape=name, n=n, block_size=bs, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=__import__("triton").__version__)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("\n| shape | N | bs | kernel | with layout ms | kernel ms | TF/s | SDPA+mask ms | Flex ms | causal flash ms | vs SDPA+mask | vs Flex | rel err |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['n']} | {r['block_size']} | error: {r['error'][:80]} |")
            continue
        f = lambda key, fmt="{:.2f}": fmt.format(r[key]) if key in r else "-"  # noqa: E731
        print(f"| {r['shape']} | {r['n']} | {r['block_size']} | {r['kernel']} | {f('ours_ms', '{:.3f}')} | {f('kernel_ms', '{:.3f}')} | {f('kernel_tflops', '{:.0f}')} | "
              f"{f('sdpa_mask_ms', '{:.3f}')} | {f('flex_ms', '{:.3f}')} | {f('sdpa_causal_flash_ms', '{:.3f}')} | {f('vs_sdpa_mask')}x | "
              f"{f('vs_flex')}x | {f('rel_err_vs_sdpa_mask', '{:.1e}')} |")
    for r in rows:
        if r.get("sweep"):
            best = sorted((v, k) for k, v in r["sweep"].items() if isinstance(v, float))[:3]
            print(f"sweep {r['shape']} N={r['n']} bs={r['block_size']}: best {best}")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
