"""Decode speed and KV memory of a Llama-3.1-8B-shaped model (random weights), dense SDPA vs patched.

GPU only; never part of the test suite. The caches are filled with random keys and values of the prompt length
(decode speed does not depend on what the prompt said, and this skips a prefill per case):

* dense: transformers' ``StaticCache`` (no per-step copy, unlike ``DynamicCache``'s concatenation) read by SDPA;
* patched: :class:`patchattn.cache.HeadBudgetCache` from a recipe whose KV plans are, per layer, half the KV
  heads streaming (sink 128 + window 4096) and half ``snapkv`` (12.5% of the prompt kept) or ``quest`` (full
  cache, 12.5% of its pages read per step).

Two figures per case: the whole model's ms per generated token (wall clock per ``model(...)`` call after
warm-up, synchronised, median of ``--steps`` steps: what a user of ``generate`` sees, host work included), and the
attention alone per layer (cache write + attention of one decode token, ``triton.testing.do_bench`` median).

    python benchmarks/decode.py --n 32768 131072 --batch 1 8 --out decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import patchattn
from patchattn import hf
from patchattn.cache import HeadBudgetCache
from patchattn.recipe import HeadPlan, KVPlan, Recipe

from ttft import random_model  # noqa: E402  (benchmarks/ is the working directory's sibling on sys.path)

SINK, WINDOW = 128, 4096
GPU_BYTES_LIMIT = 76 * 2**30


def kv_plans(n_layers: int, n_kv: int, kind: str, n_tokens: int) -> list[list[KVPlan]]:
    keep = max(64, n_tokens // 8)
    other = {
        "snapkv": KVPlan("snapkv", budget_tokens=keep, window_tokens=64),
        "quest": KVPlan("full", decode_pages=keep // 16),
    }[kind]
    return [[KVPlan("window", sink_tokens=SINK, window_tokens=WINDOW) if h % 2 == 0 else other for h in range(n_kv)] for _ in range(n_layers)]


def recipe_for(config, kind: str, n_tokens: int) -> Recipe:
    recipe = Recipe.uniform(config, "dense", block_size=128, name=f"half-streaming-half-{kind}")
    group = config.num_attention_heads // config.num_key_value_heads
    for layer in recipe.layers:
        for h in range(len(layer)):
            if (h // group) % 2 == 0:
                layer[h] = HeadPlan("streaming", {"sink_tokens": SINK, "window_tokens": WINDOW})
    recipe.kv_layers = kv_plans(config.num_hidden_layers, config.num_key_value_heads, kind, n_tokens)
    return recipe


def cache_bytes(cache) -> int:
    if isinstance(cache, HeadBudgetCache):
        return cache.kv_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def fill_dense(model, batch: int, n_tokens: int, steps: int):
    from transformers import StaticCache

    config = model.config
    cache = StaticCache(config=config, max_cache_len=n_tokens + steps + 8)
    n_kv, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    positions = torch.arange(n_tokens, device="cuda")
    for layer in range(config.num_hidden_layers):
        k = torch.randn(batch, n_kv, n_tokens, dim, device="cuda", dtype=torch.bfloat16)
        cache.update(k, torch.randn_like(k), layer, {"cache_position": positions})
    return cache


def fill_patched(model, recipe: Recipe, batch: int, n_tokens: int):
    config = model.config
    cache = HeadBudgetCache.from_recipe(recipe, config)
    n_kv, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    for layer in cache.layers:
        k = torch.randn(batch, n_kv, n_tokens, dim, device="cuda", dtype=torch.bfloat16)
        layer.update(k, torch.randn_like(k))
        q_tail = torch.randn(batch, config.num_attention_heads, 64, dim, device="cuda", dtype=torch.bfloat16)
        layer.finish_prefill(q_tail)
        del k
    return cache


@torch.no_grad()
def time_steps(model, cache, batch: int, n_tokens: int, steps: int, warmup: int = 3) -> list[float]:
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    times = []
    for i in range(warmup + steps):
        pos = torch.tensor([n_tokens + i], device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=ids, **{hf.cache_argument(model): cache}, cache_position=pos, position_ids=pos[None].expand(batch, 1), use_cache=True)
        ids = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def attention_only(config, batch: int, n_tokens: int, recipe: Recipe | None) -> float:
    """One layer: write one token and attend it (ms, do_bench median)."""
    import triton

    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // n_q
    q = torch.randn(batch, n_q, 1, dim, device="cuda", dtype=torch.bfloat16)
    k1 = torch.randn(batch, n_kv, 1, dim, device="cuda", dtype=torch.bfloat16)
    if recipe is None:
        k = torch.randn(batch, n_kv, n_tokens + 64, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)

        def step():
            k[:, :, n_tokens : n_tokens + 1] = k1
            v[:, :, n_tokens : n_tokens + 1] = k1
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        return triton.testing.do_bench(step, return_mode="median")
    plans = HeadBudgetCache.from_recipe(recipe, config).layers[0].plans
    layer = HeadBudgetCache([plans]).layers[0]
    k = torch.randn(batch, n_kv, n_tokens, dim, device="cuda", dtype=torch.bfloat16)
    layer.update(k, torch.randn_like(k))
    layer.finish_prefill(torch.randn(batch, n_q, 64, dim, device="cuda", dtype=torch.bfloat16))
    del k

    def step():
        layer.update(k1, k1)
        return layer.attend(q, None, "auto")

    return triton.testing.do_bench(step, return_mode="median")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", default=["snapkv", "quest"])
    parser.add_argument("--out", default="decode.json")
    args = parser.parse_args()

    model = random_model(args.layers)
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_per_token = 2 * args.layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2
    rows = []
    for n_tokens in args.n:
        for batch in args.batch:
            row = {"n": n_tokens, "batch": batch, "layers": args.layers}
            dense_bytes = batch * n_tokens * dense_per_token
            if weights + dense_bytes * 1.05 < GPU_BYTES_LIMIT:
                cache = fill_dense(model, batch, n_tokens, args.steps + 8)
                row["dense_kv_bytes"] = cache_bytes(cache)
                row["dense_ms"] = statistics.median(time_steps(model, cache, batch, n_tokens, args.steps))
                del cache
                torch.cuda.empty_cache()
                row["dense_attn_layer_ms"] = attention_only(config, batch, n_tokens, None)
            else:
                row["dense_kv_bytes"] = dense_bytes
                row["dense_ms"] = None  # does not fit this GPU beside the weights
            for kind in args.kinds:
                estimate = dense_bytes * (0.5 + 0.5 * (1 + 2 / 16) if kind == "quest" else 0.2)
                if weights + estimate * 1.1 > GPU_BYTES_LIMIT:
                    row[f"{kind}_kv_bytes"], row[f"{kind}_ms"], row[f"{kind}_attn_layer_ms"] = int(estimate), None, None
                    continue
                recipe = recipe_for(config, kind, n_tokens)
                patchattn.patch(model, recipe)
                cache = fill_patched(model, recipe, batch, n_tokens)
                row[f"{kind}_kv_bytes"] = cache.kv_bytes()
                row[f"{kind}_ms"] = statistics.median(time_steps(model, cache, batch, n_tokens, args.steps))
                del cache
                patchattn.unpatch(model)
                torch.cuda.empty_cache()
                row[f"{kind}_attn_layer_ms"] = attention_only(config, batch, n_tokens, recipe)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)

    print(f"\n{'N':>7} {'B':>2} | {'dense ms/tok':>12} {'KV GB':>6} | " + " | ".join(f"{k:>6} ms/tok  KV GB  speed-up  KV cut  attn/layer ms (dense)" for k in args.kinds))
    for r in rows:
        line = f"{r['n']:>7} {r['batch']:>2} | {r['dense_ms'] or float('nan'):>12.2f} {r['dense_kv_bytes'] / 1e9:>6.2f} | "
        parts = []
        for k in args.kinds:
            if r[f"{k}_ms"] is None:
                parts.append(f"{'does not fit':>13}")
                continue
            speed = (r["dense_ms"] / r[f"{k}_ms"]) if r["dense_ms"] else float("nan")
            cut = 1 - r[f"{k}_kv_bytes"] / r["dense_kv_bytes"]
            parts.append(
                f"{r[f'{k}_ms']:>13.2f} {r[f'{k}_kv_bytes'] / 1e9:>6.2f} {speed:>8.2f}x {cut:>7.1%} "
                f"{r[f'{k}_attn_layer_ms']:.3f} ({r.get('dense_attn_layer_ms', float('nan')):.3f})"
            )
        print(line + " | ".join(parts))


if __name__ == "__main__":
    main()
