"""Decode speed and KV memory of a Llama-3.1-8B-shaped model (random weights), dense SDPA vs patched.

GPU only; never part of the test suite. The caches are filled with random keys and values of the prompt length
(decode speed does not depend on what the prompt said, and this skips a prefill per case):

* dense: transformers' ``StaticCache`` (no per-step copy, unlike ``DynamicCache``'s concatenation) read by SDPA,
  eagerly and through generate's compile path (``torch.compile`` of the forward, mode reduce-overhead): the faster of
  the two is the anchor;
* patched: :class:`patchattn.cache.HeadBudgetCache` from a recipe whose KV plans are, per layer, half the KV
  heads streaming (sink 128 + window 4096) and half ``snapkv`` (12.5% of the prompt kept) or ``quest`` (full
  cache, 12.5% of its pages read per step), eagerly and replayed as one CUDA graph of the whole step
  (:mod:`patchattn.decode_graphs`, what generate's compile path runs for a patched model; its norms and MLPs run by the
  eager-exact kernels of :mod:`patchattn.decode_fusion`, the default on CUDA, unless ``PATCHATTN_DECODE_FUSE`` says
  otherwise); ``--modules-eager``, ``--modules-compiled`` and ``--modules-exact`` also time the graph with its norms
  and MLPs eager, compiled by inductor, or run by the eager-exact kernels.

Per case: each row's ms per generated token (wall clock per call after warm-up, synchronised, median of
``--steps`` steps: what a user of ``generate`` sees, host work included), tokens/s, KV bytes held and read, the
fraction of its floor ((weights + KV bytes the step reads) / the HBM copy bandwidth measured in the same run), and
the attention alone per layer (cache write + attention of one decode token, ``triton.testing.do_bench`` median).

    python benchmarks/decode.py --n 8192 32768 131072 --batch 1 8 --out decode.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time

import torch

import patchattn
from patchattn import decode_fusion, decode_graphs, hf
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


def step_inputs(model, ids, cache, n_tokens: int, i: int) -> dict:
    pos = torch.tensor([n_tokens + i], device="cuda")
    inputs = {"input_ids": ids, hf.cache_argument(model): cache, "position_ids": pos[None].expand(ids.shape[0], 1), "use_cache": True}
    if "cache_position" in inspect.signature(type(model).forward).parameters:
        inputs["cache_position"] = pos
    return inputs


@torch.no_grad()
def time_steps(model, cache, batch: int, n_tokens: int, steps: int, warmup: int = 3, call=None) -> list[float]:
    """Wall-clock ms of each of ``steps`` decode steps after ``warmup`` (synchronised: what ``generate`` sees, host
    work included). ``call``: what runs a step (default: the model's eager forward)."""
    call = call or model
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = call(**step_inputs(model, ids, cache, n_tokens, i))
        ids = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def compiled_forward(model):
    """generate's own compile path for a static cache: ``torch.compile`` of the forward with transformers'
    ``CompileConfig`` defaults (mode reduce-overhead: CUDA graphs; static shapes) -- the dense anchor."""
    from transformers import CompileConfig

    return torch.compile(model.forward, **CompileConfig().to_dict())


def hbm_bandwidth() -> float:
    """Bytes per second of a 2 GiB device copy (read + write), measured in this run."""
    import triton

    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    del x, y
    return 2 * 2**30 / (ms * 1e-3)


def read_bytes(cache: HeadBudgetCache) -> int:
    """KV bytes one decode step reads from the budgeted cache: each head's valid slots, a Quest head its picked
    pages and every page's key bounds."""
    total = 0
    for layer in cache.layers:
        dim, elem = layer.keys.shape[-1], layer.keys.element_size()
        valid = layer.valid_t.to("cpu")  # (B, Hkv)
        for h, policy in enumerate(layer.policies):
            n = valid[:, h]
            if policy.decode_pages > 0:
                pages = (n + layer.page - 1) // layer.page
                total += int((pages.clamp(max=policy.decode_pages) * layer.page * 2 + pages * 2).sum()) * dim * elem
            else:
                total += int(n.sum()) * 2 * dim * elem
    return total


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


def dense_row(model, row: dict, batch: int, n_tokens: int, args, compiled) -> None:
    """Dense SDPA over transformers' StaticCache: eager, and through generate's compile path."""
    cache = fill_dense(model, batch, n_tokens, args.steps + 8)
    row["dense_kv_bytes"] = cache_bytes(cache)
    row["dense_ms"] = statistics.median(time_steps(model, cache, batch, n_tokens, args.steps))
    if compiled is not None:  # a fresh cache: 5.17's StaticLayer writes at its own running count, not cache_position
        del cache
        torch.cuda.empty_cache()
        cache = fill_dense(model, batch, n_tokens, args.steps + 8)
        start = time.perf_counter()
        row["dense_compiled_ms"] = statistics.median(time_steps(model, cache, batch, n_tokens, args.steps, warmup=4, call=compiled))
        row["dense_compiled_wall_s"] = round(time.perf_counter() - start, 1)  # compile and capture included
    del cache
    torch.cuda.empty_cache()
    row["dense_attn_layer_ms"] = attention_only(model.config, batch, n_tokens, None)


def patched_row(model, row: dict, kind: str, batch: int, n_tokens: int, args) -> None:
    """The budgeted cache: eager steps, then the same cache's steps replayed as one CUDA graph of the whole model."""
    recipe = recipe_for(model.config, kind, n_tokens)
    patchattn.patch(model, recipe)
    cache = fill_patched(model, recipe, batch, n_tokens)
    row[f"{kind}_kv_bytes"] = cache.kv_bytes()
    row[f"{kind}_read_bytes"] = read_bytes(cache)
    row[f"{kind}_ms"] = statistics.median(time_steps(model, cache, batch, n_tokens, args.steps))
    runner = decode_graphs.runner_for(model)
    times = time_steps(model, cache, batch, n_tokens, args.steps, warmup=3, call=runner)
    row[f"{kind}_graph_ms"] = statistics.median(times)
    row[f"{kind}_graph_paths"] = dict(runner.paths)
    row[f"{kind}_graph_modules"] = decode_fusion.setting() if runner.fusion is not None else "eager"
    admitted = take_down_fusion(runner)  # the default's fusion, before the rows that set their own
    if admitted:
        row[f"{kind}_graph_modules_admitted"] = admitted
    del cache
    before = os.environ.get("PATCHATTN_DECODE_FUSE")
    for name, setting in fused_module_settings(args):  # the same graph with its norms and MLPs run another way
        os.environ["PATCHATTN_DECODE_FUSE"] = setting
        cache = fill_patched(model, recipe, batch, n_tokens)
        row[f"{kind}_graph_modules_{name}_ms"] = statistics.median(time_steps(model, cache, batch, n_tokens, args.steps, warmup=3, call=runner))
        admitted = take_down_fusion(runner)  # built anew by the next setting
        if admitted:
            row[f"{kind}_graph_modules_{name}_admitted"] = admitted
        os.environ.pop("PATCHATTN_DECODE_FUSE")
        if before is not None:
            os.environ["PATCHATTN_DECODE_FUSE"] = before
        del cache
    if args.unfused:  # the token write and the Quest bounds as the PyTorch references' launches (chosen at allocation)
        os.environ.update(PATCHATTN_FUSED_WRITE="0", PATCHATTN_FUSED_QUEST="0")
        cache = fill_patched(model, recipe, batch, n_tokens)
        row[f"{kind}_graph_unfused_ms"] = statistics.median(time_steps(model, cache, batch, n_tokens, args.steps, warmup=3, call=runner))
        os.environ.pop("PATCHATTN_FUSED_WRITE")
        os.environ.pop("PATCHATTN_FUSED_QUEST")
        del cache
    patchattn.unpatch(model)
    torch.cuda.empty_cache()
    row[f"{kind}_attn_layer_ms"] = attention_only(model.config, batch, n_tokens, recipe)


def take_down_fusion(runner) -> dict:
    """Remove the runner's norm and MLP fusion, if it built one; the exact backend's verdicts by module class."""
    fusion, runner.fusion = runner.fusion, None
    if fusion is None:
        return {}
    fusion.remove()
    return {key[0].__name__: verdict for key, verdict in fusion.admitted.items()}


def fused_module_settings(args) -> list[tuple[str, str]]:
    """(row name, PATCHATTN_DECODE_FUSE) of each extra graph row the flags ask for."""
    return [(n, v) for n, v, on in (("eager", "0", args.modules_eager), ("compiled", "1", args.modules_compiled),
                                    ("exact", "exact", args.modules_exact)) if on]


def add_ratios(row: dict, kinds, weights: int, bandwidth: float) -> None:
    """Tokens/s, the anchor (the faster dense row), each row's speed-up over it and its fraction of its floor
    ((weights + the KV bytes its step reads) / the bandwidth measured in this run)."""
    dense = [row.get(k) for k in ("dense_ms", "dense_compiled_ms") if row.get(k)]
    row["anchor_ms"] = min(dense) if dense else None
    floor = lambda kv: (weights + kv) / bandwidth * 1e3  # noqa: E731
    row["dense_floor_ms"] = floor(row["dense_kv_bytes"])
    for key in ("dense_ms", "dense_compiled_ms"):
        if row.get(key):
            row[key.replace("_ms", "_floor_fraction")] = row["dense_floor_ms"] / row[key]
    for kind in kinds:
        if row.get(f"{kind}_ms") is None:
            continue
        row[f"{kind}_floor_ms"] = floor(row[f"{kind}_read_bytes"])
        for key in (f"{kind}_ms", f"{kind}_graph_ms", f"{kind}_graph_unfused_ms", f"{kind}_graph_modules_eager_ms",
                    f"{kind}_graph_modules_compiled_ms", f"{kind}_graph_modules_exact_ms"):
            if row.get(key) is None:
                continue
            row[key.replace("_ms", "_tokens_per_s")] = row["batch"] * 1e3 / row[key]
            row[key.replace("_ms", "_floor_fraction")] = row[f"{kind}_floor_ms"] / row[key]
            if row["anchor_ms"]:
                row[key.replace("_ms", "_speedup")] = row["anchor_ms"] / row[key]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", default=["snapkv", "quest"])
    parser.add_argument("--unfused", action="store_true", help="also time the graphed step with the token write and Quest's bounds as the PyTorch references (PATCHATTN_FUSED_WRITE=0, PATCHATTN_FUSED_QUEST=0)")
    parser.add_argument("--modules-eager", action="store_true", help="also time the graphed step with its norms and MLPs eager (PATCHATTN_DECODE_FUSE=0)")
    parser.add_argument("--modules-exact", action="store_true", help="also time the graphed step with its norms and MLPs run by the eager-exact kernels where they are bit-exact (PATCHATTN_DECODE_FUSE=exact)")
    parser.add_argument("--modules-compiled", action="store_true", help="also time the graphed step with its norms and MLPs compiled by inductor (PATCHATTN_DECODE_FUSE=1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the dense compiled row (its compiles take minutes)")
    parser.add_argument("--out", default="decode.json")
    args = parser.parse_args()

    model = random_model(args.layers)
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = hbm_bandwidth()
    compiled = None if args.no_compile else compiled_forward(model)
    dense_per_token = 2 * args.layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2
    rows = []
    for n_tokens in args.n:
        for batch in args.batch:
            row = {"n": n_tokens, "batch": batch, "layers": args.layers}
            dense_bytes = batch * n_tokens * dense_per_token
            if weights + dense_bytes * 1.05 < GPU_BYTES_LIMIT:
                dense_row(model, row, batch, n_tokens, args, compiled)
            else:
                row["dense_kv_bytes"] = dense_bytes
                row["dense_ms"] = None  # does not fit this GPU beside the weights
            for kind in args.kinds:
                estimate = dense_bytes * (0.5 + 0.5 * (1 + 2 / 16) if kind == "quest" else 0.2)
                if weights + estimate * 1.1 > GPU_BYTES_LIMIT:
                    row[f"{kind}_kv_bytes"], row[f"{kind}_ms"] = int(estimate), None
                    continue
                patched_row(model, row, kind, batch, n_tokens, args)
            add_ratios(row, args.kinds, weights, bandwidth)
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bandwidth_GBps": bandwidth / 1e9,
                           "weights_bytes": weights, "rows": rows}, f, indent=1)

    print(f"\nHBM copy bandwidth {bandwidth / 1e9:.0f} GB/s; ms per token (fraction of its floor) [speed-up over the anchor]")
    print(f"{'N':>7} {'B':>2} | {'dense eager':>16} {'dense compiled':>16} | "
          + " | ".join(f"{k + ' eager':>22} {k + ' graph':>22} {'KV cut':>6}" for k in args.kinds))
    fmt = lambda r, key: "-" if r.get(key) is None else f"{r[key]:.2f} ({r.get(key.replace('_ms', '_floor_fraction'), float('nan')):.2f})"  # noqa: E731
    extra = [f"{{}}_graph_modules_{name}_ms" for name, _ in fused_module_settings(args)]
    if extra:
        print(f"(then per kind: the graph with the norms and MLPs run: {', '.join(n for n, _ in fused_module_settings(args))})")
    for r in rows:
        line = f"{r['n']:>7} {r['batch']:>2} | {fmt(r, 'dense_ms'):>16} {fmt(r, 'dense_compiled_ms'):>16} | "
        parts = []
        for k in args.kinds:
            if r.get(f"{k}_ms") is None:
                parts.append(f"{'does not fit':>52}")
                continue
            cut = 1 - r[f"{k}_kv_bytes"] / r["dense_kv_bytes"]
            parts.append(" ".join(f"{fmt(r, key) + ' [' + format(r.get(key.replace('_ms', '_speedup'), float('nan')), '.2f') + 'x]':>22}"
                                  for key in (f"{k}_ms", f"{k}_graph_ms", *(e.format(k) for e in extra))) + f" {cut:>6.1%}")
        print(line + " | ".join(parts))


if __name__ == "__main__":
    main()
