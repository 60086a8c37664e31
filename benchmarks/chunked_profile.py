"""Where a chunked prefill's extra time goes: GPU kernel totals of ``generate`` to its first token, unchunked and in
chunks, on the Llama-3.1-8B shape (random weights) patched with one of ``ttft.py``'s recipes (issue 19).

GPU only; never part of the test suite. Runs each variant once untimed, then once under ``torch.profiler``, and
writes JSON: wall ms, summed kernel ms, and the kernels' totals grouped by name (top ``--top``) per variant.

    python benchmarks/chunked_profile.py --tokens 131072 --chunk 16384 --kind mixed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patchattn  # noqa: E402
from ttft import random_model, sparse_recipe  # noqa: E402


def profiled(model, ids, chunk: int | None, top: int) -> dict:
    greedy = dict(max_new_tokens=1, do_sample=False, prefill_chunk_size=chunk, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **greedy)  # untimed: kernel variants, layouts
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **greedy)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1000
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.generate(ids, **greedy)
            torch.cuda.synchronize()
    totals, calls = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:90]
            totals[name] += event.device_time_total / 1000
            calls[name] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return {"wall_ms": round(wall, 1), "kernel_ms": round(sum(totals.values()), 1),
            "top": [{"kernel": k, "ms": round(v, 2), "calls": calls[k]} for k, v in ranked[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--chunk", default="16384", help="comma-separated chunk sizes")
    parser.add_argument("--kind", default="mixed")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default="chunked_profile.json")
    args = parser.parse_args()
    model = random_model(None, "8b")
    ids = torch.randint(0, 128256, (1, args.tokens), device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens, "kind": args.kind}
    with patchattn.patched(model, sparse_recipe(model.config, args.kind), backend="auto"):
        for chunk in [None] + [int(c) for c in args.chunk.split(",")]:
            row = profiled(model, ids, chunk, args.top)
            result[f"chunk_{chunk or 'none'}"] = row
            print(f"chunk {chunk}: wall {row['wall_ms']} ms, kernels {row['kernel_ms']} ms", flush=True)
            for item in row["top"]:
                print(f"  {item['ms']:>10.2f} ms {item['calls']:>6}  {item['kernel']}")
            torch.cuda.empty_cache()
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
