"""The Gluon Hopper prefill kernel's launch variants (K/V ring depth, consumer turns, consumer registers): first its
correctness against the PyTorch reference on small shapes (bf16/fp16, d 64/128, tails, GQA, queries after keys),
then dense causal and sink 128 + window 4096 at 32K and 128K (B=1, 32/8 heads, d=128, bf16) against the Triton
kernel, SDPA's default dispatch and FlexAttention. GPU (Hopper) only; writes $OUT/prefill_gluon_variants.json.

    python benchmarks/prefill_gluon_variants.py
"""
import json, os, sys, time, math, warnings
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import torch, triton, triton.testing
from patchattn.kernels.sparse_prefill.naive import sparse_prefill_naive
from patchattn.kernels.sparse_prefill.kernel import sparse_prefill_triton
from patchattn.kernels.sparse_prefill import hopper as H
from patchattn.kernels import finalize_ragged
from patchattn.layout import finalize, to_ragged, causal_blocks, num_blocks
OUT = os.environ.get("OUT", ".")
res = dict(meta=dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                     date=time.strftime("%Y-%m-%d")), checks=[], times=[])
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
g = torch.Generator(device="cuda").manual_seed(0)
t0 = time.time()
# ---- correctness
for dtype in (torch.bfloat16, torch.float16):
    for D in (128, 64):
        for (N, Nk, hq, hk) in ((1000, 1000, 8, 2), (4096, 4096, 4, 1), (384, 1000, 4, 4), (129, 129, 2, 1)):
            nb, nkb = num_blocks(N, 128), num_blocks(Nk, 128)
            q = torch.randn(2, hq, N, D, device="cuda", dtype=dtype, generator=g)
            k = torch.randn(2, hk, Nk, D, device="cuda", dtype=dtype, generator=g)
            v = torch.randn(2, hk, Nk, D, device="cuda", dtype=dtype, generator=g)
            shift = (Nk - N)
            qpos_last_block = (torch.arange(nb, device="cuda") * 128 + 127 + shift).clamp(max=Nk - 1) // 128
            causal = torch.arange(nkb, device="cuda")[None, :] <= qpos_last_block[:, None]
            for name in ("dense", "random"):
                if name == "dense":
                    keep = causal.expand(2, hq, nb, nkb).clone()
                else:
                    keep = (torch.rand(2, hq, nb, nkb, device="cuda", generator=g) < 0.3) & causal
                    keep[..., 0] = True
                    idx = torch.arange(nb, device="cuda")
                    keep[:, :, idx, qpos_last_block] = True
                counts, ids = to_ragged(keep)[:2]
                ref = sparse_prefill_naive(q.float(), k.float(), v.float(), counts, ids, 128)
                out = torch.full_like(q, float("nan"))
                try:
                    H.sparse_prefill_hopper(q, k, v, counts, ids, 128, out=out)
                    torch.cuda.synchronize()
                    e = rel(out, ref); nan = bool(out.isnan().any())
                except Exception as exc:
                    e, nan = None, str(exc)[:300]
                tri = sparse_prefill_triton(q, k, v, counts, ids, 128)
                row = dict(dtype=str(dtype), D=D, N=N, Nk=Nk, hq=hq, hk=hk, layout=name, rel_err=e, nan=nan, triton_rel_err=rel(tri, ref))
                res["checks"].append(row); print(row, flush=True)
print(f"checks {time.time()-t0:.0f}s", flush=True)
ok = all(r["rel_err"] is not None and r["rel_err"] < 1e-2 and r["nan"] is False for r in res["checks"])
print("ALL OK" if ok else "FAILURES", flush=True)
json.dump(res, open(f"{OUT}/prefill_gluon_variants.json", "w"), indent=1)
# ---- timing
from prefill import static_layout, make_flex, other_sdpa
warnings.filterwarnings("ignore")
flex, block_mask_of = make_flex()
sdpa_default = other_sdpa()["sdpa_default"]
def bench(fn, rep=300):
    fn(); torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")
for n in (32768, 131072):
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    sd = bench(lambda: sdpa_default(q, k, v))
    ref_dense = sdpa_default(q, k, v)
    for case in ("dense", "streaming"):
        keep = finalize(static_layout(case, n))
        counts, ids, fill = finalize_ragged(keep)
        pairs = counts.sum().item() - counts.numel() / 2
        flops = 4.0 * 128 * 128 * 128 * pairs
        row = dict(n=n, case=case, sdpa_default_ms=sd)
        row["triton_ms"] = bench(lambda: sparse_prefill_triton(q, k, v, counts, ids, 128, density=fill))
        for regs, pp, st in ((240, True, 2), (240, False, 2), (240, True, 3), (240, False, 3), (232, True, 3)):
            try:
                kw = dict(consumer_regs=regs, pingpong=pp, stages=st)
                o = H.sparse_prefill_hopper(q, k, v, counts, ids, 128, **kw)
                tri = sparse_prefill_triton(q, k, v, counts, ids, 128, density=fill)
                row[f"hopper_r{regs}{pp}{st}_err_vs_triton"] = rel(o, tri)
                if case == "dense":
                    row[f"hopper_r{regs}{pp}{st}_err_vs_sdpa"] = rel(o, ref_dense)
                row[f"hopper_r{regs}{pp}{st}_ms"] = bench(lambda: H.sparse_prefill_hopper(q, k, v, counts, ids, 128, **kw))
            except Exception as exc:
                row[f"hopper_r{regs}{pp}{st}_error"] = str(exc)[:300]
        bm = block_mask_of(keep, n)
        row["flex_ms"] = bench(lambda: flex(q, k, v, bm))
        del bm
        best = min(row[x] for x in row if x.startswith("hopper_r") and x.endswith("_ms")) if any(x.startswith("hopper_r") and x.endswith("_ms") for x in row) else float("nan")
        row.update(tflops_hopper=flops / best * 1e-9, tflops_triton=flops / row["triton_ms"] * 1e-9,
                   hopper_vs_sdpa=sd / best if case == "dense" else None, hopper_vs_flex=row["flex_ms"] / best,
                   triton_vs_flex=row["flex_ms"] / row["triton_ms"])
        res["times"].append(row); print(json.dumps({a: (round(b, 3) if isinstance(b, float) else b) for a, b in row.items() if 'err' not in a or 'error' in a}), flush=True)
        json.dump(res, open(f"{OUT}/prefill_gluon_variants.json", "w"), indent=1)
    del q, k, v, ref_dense; torch.cuda.empty_cache()
print("| N | case | SDPA | Flex | triton | hopper best | TF/s hopper | vs SDPA | vs Flex |")
for r in res["times"]:
    b = min(r[x] for x in r if x.startswith("hopper_r") and x.endswith("_ms")) if any(x.startswith("hopper_r") and x.endswith("_ms") for x in r) else float("nan")
    print(f"| {r['n']} | {r['case']} | {r['sdpa_default_ms']:.2f} | {r['flex_ms']:.2f} | {r['triton_ms']:.2f} | {b:.2f} | {r['tflops_hopper']:.0f} | {r['hopper_vs_sdpa']} | {r['hopper_vs_flex']:.2f} |")
