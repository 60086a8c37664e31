"""Time to first token of a Llama-3.1-8B-shaped model (random weights), dense SDPA vs patched.

GPU only; never part of the test suite. One run measures, for each prompt length, the median prefill
time (``logits_to_keep=1``, synchronised, warm-up excluded) of the unpatched model with SDPA and of the
same model patched with a recipe of >= 90% sparsity, and writes JSON. ``--chunk C`` adds ``generate``'s time to its
first token and peak memory, unchunked and with ``prefill_chunk_size=C`` (:mod:`patchattn.chunked`); ``--break-even
2048,4096,8192`` first fits each layer's prefill break-even at those lengths, as ``patchattn calibrate`` does on a GPU
(:mod:`patchattn.calibrate.breakeven`), so each row is what a calibrated recipe does; ``--bound-from N`` adds, from
N tokens up, issue 19's bound (what the time to first token would be if only attention changed) and each row's
fraction of it. ``--shape 1b`` runs the Llama-3.2-1B dimensions.

    python benchmarks/ttft.py --lengths 32768,131072 --chunk 8192 --out ttft.json
    python benchmarks/ttft.py --shape 1b --kinds issue19 --lengths 2048,4096,8192,16384,32768,65536 \
        --break-even 2048,4096,8192 --bound-from 16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import patchattn  # noqa: E402
from patchattn.calibrate.breakeven import fit_break_even, time_layers  # noqa: E402
from patchattn.recipe import HeadPlan, Recipe  # noqa: E402
from patchattn.stats import record_sparsity  # noqa: E402


SHAPES = {  # hidden, intermediate, q heads, KV heads, default layers
    "8b": (4096, 14336, 32, 8, 32),  # Llama-3.1-8B
    "1b": (2048, 8192, 32, 8, 16),  # Llama-3.2-1B (head dim 64)
    "135m": (576, 1536, 9, 3, 30),  # SmolLM2-135M (head dim 64): launch-bound at 2-8K
}


def llama_config(shape: str, layers: int | None):
    from transformers import LlamaConfig

    hidden, inter, heads, kv, default_layers = SHAPES[shape]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers or default_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        architectures=["LlamaForCausalLM"],
    )


def random_model(layers: int | None, shape: str = "8b"):
    from transformers import AutoModelForCausalLM

    config = llama_config(shape, layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # to_empty left the rotary buffers uninitialised: rebuild that module on the GPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config, device="cuda")
    return model.eval()


MIXED_WINDOWS = (1024, 2048, 4096, 8192)
MIXED_VS = ((1024, 2048), (2048, 4096), (4096, 4096), (1024, 8192))


def sparse_recipe(config, kind: str, block_size: int = 128) -> Recipe:
    """Half the heads streaming (sink 128 + window 4096), half ``kind`` (vertical-slash, block top-k, or
    streaming too). Random weights give near-uniform attention, so block top-k's adaptive density is high
    on them: its row shows the kernel at whatever density it chose, reported beside it. ``mixed``: what a
    calibrated recipe looks like, every head its own budget (streaming windows 1K-8K on even heads,
    vertical-slash budgets on odd ones, varying with the layer). ``issue19``: the plan of issue 19's table, three
    heads in four streaming (sink 64 + window 2048), the fourth vertical-slash (1024 + 2048)."""
    recipe = Recipe.uniform(config, "dense", block_size=block_size, name=f"ttft-{kind}")
    for li, layer in enumerate(recipe.layers):
        for h in range(len(layer)):
            if kind == "issue19":
                layer[h] = (HeadPlan("vertical_slash", {"vertical_tokens": 1024, "slash_tokens": 2048}) if h % 4 == 3
                            else HeadPlan("streaming", {"sink_tokens": 64, "window_tokens": 2048}))
            elif kind == "mixed":
                if h % 2 == 0:
                    window = MIXED_WINDOWS[(h // 2 + li) % len(MIXED_WINDOWS)]
                    layer[h] = HeadPlan("streaming", {"sink_tokens": 128, "window_tokens": window})
                else:
                    vertical, slash = MIXED_VS[(h // 2 + li) % len(MIXED_VS)]
                    layer[h] = HeadPlan("vertical_slash", {"vertical_tokens": vertical, "slash_tokens": slash})
            elif h % 2 == 0 or kind == "streaming":
                layer[h] = HeadPlan("streaming", {"sink_tokens": 128, "window_tokens": 4096})
            elif kind == "vertical_slash":
                layer[h] = HeadPlan("vertical_slash", {"vertical_tokens": 2048, "slash_tokens": 4096})
            else:
                layer[h] = HeadPlan("block_topk", {"threshold": 0.9})
    return recipe


def time_prefill(model, ids, reps: int) -> list[float]:
    times = []
    with torch.no_grad():
        model(ids[:, :4096], logits_to_keep=1, use_cache=False)  # warm-up / compile
        model(ids, logits_to_keep=1, use_cache=False)  # and at this length (kernel variants, cached layouts)
        for _ in range(reps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(ids, logits_to_keep=1, use_cache=False)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return times


def time_generate(model, ids, reps: int, chunk: int | None) -> tuple[float, float]:
    """(median ms, peak GB) of ``generate`` up to its first token (the model's own cache; prefill in ``chunk``-token
    chunks when given): the time to first token a user sees, and the memory it takes."""
    times, peaks = [], []
    greedy = dict(max_new_tokens=1, do_sample=False, prefill_chunk_size=chunk, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:, : 2 * chunk if chunk else 4096], **greedy)  # warm-up (chunked: chunks against earlier keys too)
        for _ in range(reps):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
            peaks.append(torch.cuda.max_memory_allocated() / 1e9)
    return statistics.median(times), max(peaks)


def generate_rows(model, ids, reps: int, chunk: int, prefix: str) -> dict:
    """TTFT and peak memory of generate, unchunked and in ``chunk``-token chunks."""
    whole_ms, whole_gb = time_generate(model, ids, reps, None)
    part_ms, part_gb = time_generate(model, ids, reps, chunk)
    return {f"{prefix}_generate_ms": round(whole_ms, 1), f"{prefix}_generate_peak_gb": round(whole_gb, 2),
            f"{prefix}_chunked_ms": round(part_ms, 1), f"{prefix}_chunked_peak_gb": round(part_gb, 2),
            f"{prefix}_chunked_time_ratio": round(part_ms / whole_ms, 3)}


def attention_bound(model, recipe, ids, dense_ms: float) -> dict:
    """Issue 19's bound at this length: the time to first token if only attention changed, dense TTFT / (dense TTFT -
    dense attention + the patched attention), each layer's attention timed alone on the model's own queries, keys and
    values (:func:`patchattn.calibrate.breakeven.time_layers`: wall clock, launches included); a layer under its
    break-even counts its dense time, as it runs."""
    timings = time_layers(model, recipe, ids, [ids.shape[1]], runs=3)
    floor = recipe.layer_min_tokens or [0] * len(timings)
    dense_attn = patched_attn = 0.0
    for t, least in zip(timings, floor):
        if not t.lengths:  # an all-dense layer: the same call either way
            continue
        dense_attn += t.dense_ms[0]
        patched_attn += t.sparse_ms[0] if ids.shape[1] >= least else t.dense_ms[0]
    bound = dense_ms / (dense_ms - dense_attn + patched_attn)
    return {"attn_dense_ms": round(dense_attn, 1), "attn_patched_ms": round(patched_attn, 1), "bound": round(bound, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="Llama-3.1-8B, Llama-3.2-1B or SmolLM2-135M dimensions")
    parser.add_argument("--layers", type=int, default=None, help="default: the shape's own (32 for 8b, 16 for 1b)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--kinds", default="vertical_slash,streaming,mixed")
    parser.add_argument("--break-even", default="", help="comma-separated lengths: fit each layer's prefill break-even at them first (what calibrate does on a GPU) and run each recipe with it")
    parser.add_argument("--chunk", type=int, default=0, help="also time generate's first token unchunked and in chunks of this many tokens (prefill_chunk_size), with peak memory")
    parser.add_argument("--bound-from", type=int, default=0, help="from this length up, also time each layer's attention alone, dense and patched, and report issue 19's bound (dense TTFT / (dense TTFT - dense attention + patched attention)) and each row's fraction of it")
    parser.add_argument("--out", default="ttft.json")
    args = parser.parse_args()
    model = random_model(args.layers, args.shape)
    rows = []
    first = int(args.lengths.split(",")[0])
    warm = torch.randint(0, 128256, (1, first), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    for kind in args.kinds.split(","):  # the process's first patched calls (allocator, kernels, logs) go untimed
        with patchattn.patched(model, sparse_recipe(model.config, kind, args.block_size), backend="auto"):
            time_prefill(model, warm, 1)
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, 128256, (1, n), device="cuda", generator=torch.Generator(device="cuda").manual_seed(n))
        dense_times = time_prefill(model, ids, args.reps)
        dense = statistics.median(dense_times)
        row = {"tokens": n, "dense_sdpa_ms": round(dense, 1)}
        if args.chunk:
            row.update(generate_rows(model, ids, args.reps, args.chunk, "dense"))
        for kind in args.kinds.split(","):
            recipe = sparse_recipe(model.config, kind, args.block_size)
            if args.break_even:
                lengths = [int(x) for x in args.break_even.split(",")]
                fit_ids = torch.randint(0, 128256, (1, max(lengths)), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
                record = fit_break_even(model, recipe, fit_ids, lengths)
                row[f"{kind}_break_even"] = [layer and layer["min_sparse_tokens"] for layer in record["layers"]]
            with patchattn.patched(model, recipe, backend="auto"):
                patched_ms = statistics.median(time_prefill(model, ids, args.reps))
                with record_sparsity() as rec, torch.no_grad():  # untimed: recording reads counts back per layer
                    model(ids, logits_to_keep=1, use_cache=False)
                if args.chunk:
                    row.update(generate_rows(model, ids, args.reps, args.chunk, kind))
            row[f"{kind}_ms"] = round(patched_ms, 1)
            row[f"{kind}_sparsity"] = round(rec.sparsity or 0.0, 4)
            row[f"{kind}_kernels"] = dict(rec.kernels)  # which implementation ran each layer's prefill
            if args.bound_from and n >= args.bound_from:
                row.update({f"{kind}_{key}": value for key, value in attention_bound(model, recipe, ids, dense).items()})
        # dense again after the patched rows, so a drift of the machine's clocks over the row weighs on both sides
        dense_times += time_prefill(model, ids, args.reps)
        dense = statistics.median(dense_times)
        row["dense_sdpa_ms"], row["dense_sdpa_all_ms"] = round(dense, 1), [round(t, 1) for t in dense_times]
        for kind in args.kinds.split(","):
            row[f"{kind}_speedup"] = round(dense / row[f"{kind}_ms"], 3)
            if f"{kind}_bound" in row:
                row[f"{kind}_of_bound"] = round(row[f"{kind}_speedup"] / row[f"{kind}_bound"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": f"Llama-{'3.1-8B' if args.shape == '8b' else '3.2-1B'} shape, {model.config.num_hidden_layers} layers, random bf16 weights",
        "rows": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"{'tokens':>8} {'dense ms':>9} " + " ".join(f"{k + ' ms':>18} {'x':>6} {'sparsity':>8} {'bound':>6} {'of it':>6}" for k in args.kinds.split(",")))
    for r in rows:
        print(f"{r['tokens']:>8} {r['dense_sdpa_ms']:>9} " + " ".join(
            f"{r[k + '_ms']:>18} {r[k + '_speedup']:>6} {r[k + '_sparsity']:>8} {r.get(k + '_bound', '-'):>6} {r.get(k + '_of_bound', '-'):>6}"
            for k in args.kinds.split(",")))


if __name__ == "__main__":
    main()
