"""Where a patched prefill's time goes on a small model: SmolLM2-135M's shape (random weights) with a shipped recipe.

GPU only; never part of the test suite. Times the whole forward (``logits_to_keep=1``, no cache) dense and
patched, then one patched forward under torch.profiler: host time per op, kernel launches, and the time spent
building layouts (strategy estimates, layouts, ragged indices) against the attention kernel itself.

    python benchmarks/prefill_overhead.py --recipe recipes/smollm2-135m-instruct-8k-s80.json --n 8192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from ttft import time_prefill  # noqa: E402  (benchmarks/ is this script's directory)

import patchattn
from patchattn.recipe import Recipe, model_identity


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )


def timed(model, ids, reps=5):
    return statistics.median(time_prefill(model, ids, reps))


def find_syncs(model, recipe, ids) -> dict:
    """Where one patched forward synchronises with the GPU: torch's sync debug mode, warnings keyed by the
    innermost patchattn/transformers frame."""
    import collections
    import traceback
    import warnings

    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-2] if "patchattn" in f.filename or "transformers" in f.filename]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[-3:][::-1])
        sites[f"{str(message)[:40]} @ {where}"] += 1

    with patchattn.patched(model, recipe), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(ids, logits_to_keep=1, use_cache=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for site, count in sites.most_common(15):
        print(f"  sync x{count}: {site}", flush=True)
    return dict(sites)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", action="append", default=[])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--find-syncs", action="store_true", help="print where the patched forward synchronises")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "prefill_overhead.json"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    config = smollm2_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    ids = torch.randint(0, config.vocab_size, (1, args.n), device="cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "n": args.n, "dense_ms": timed(model, ids)}
    print(f"dense {result['dense_ms']:.1f} ms", flush=True)
    for path in args.recipe:
        data = json.load(open(path))
        data["model"] = model_identity(config)  # the same geometry; random weights
        recipe = Recipe.from_dict(data)
        row = {}
        with patchattn.patched(model, recipe, cuda_graphs=True):  # patchattn.graphs: one replay per layer
            row["patched_cuda_graphs_ms"] = timed(model, ids)
        with patchattn.patched(model, recipe, cuda_graphs=False):
            row["patched_ms"] = timed(model, ids)
            from torch.profiler import ProfilerActivity, profile

            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(ids, logits_to_keep=1, use_cache=False)
                torch.cuda.synchronize()
        events = prof.key_averages()
        row["kernel_launches"] = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
        row["syncs"] = sum(e.count for e in events if "Synchronize" in e.key or e.key == "aten::_local_scalar_dense")
        table = events.table(sort_by="self_cpu_time_total", row_limit=25)
        cuda_table = events.table(sort_by="self_device_time_total", row_limit=15)
        if args.find_syncs:
            row["sync_sites"] = find_syncs(model, recipe, ids)
        result[os.path.basename(path)] = row
        print(f"{os.path.basename(path)}: {row}", flush=True)
        print(table, flush=True)
        print(cuda_table, flush=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
