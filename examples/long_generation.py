"""Long generation through the head-budgeted KV cache on the embedded SmolLM2 (CPU is fine).

An 8K-token prompt of held-out prose, then 1,024 greedy tokens, three ways on the same prompt: dense (transformers'
own cache), a recipe whose KV plans keep and read everything (must give dense's tokens), and a recipe whose KV
heads keep sinks + a window (the ring wraps several times). Prints tokens/s, KV bytes at the end, where each
generation first leaves dense's tokens, and the tail of each text.

    python examples/long_generation.py --prompt 8192 --new 1024 --window 1024
"""

from __future__ import annotations

import argparse
import time

import torch

import patchattn
from patchattn import hf
from patchattn.eval.tasks import cache_bytes, ppl_input_ids
from patchattn.models import load_model
from patchattn.recipe import KVPlan, Recipe


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--new", type=int, default=1024)
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--window", type=int, default=1024)
    args = parser.parse_args()

    model, tokenizer = load_model(None, dtype="float32", device="cpu")
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    prompt_len = min(args.prompt, model.config.max_position_embeddings - args.new)
    ids = torch.tensor([ppl_input_ids(tokenizer, prompt_len, seed=7)])
    greedy = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, return_dict_in_generate=True,
                  pad_token_id=tokenizer.eos_token_id)

    keep_all = Recipe.uniform(model.config, "dense", name="keep-all")
    keep_all.kv_layers = [[KVPlan("full", decode_pages=10**6) for _ in range(n_kv)] for _ in range(n_layers)]
    window = Recipe.uniform(model.config, "dense", name=f"sink{args.sink}+window{args.window}")
    window.kv_layers = [[KVPlan("window", sink_tokens=args.sink, window_tokens=args.window) for _ in range(n_kv)] for _ in range(n_layers)]

    runs = {}
    for name, recipe in {"dense": None, "keep-all": keep_all, window.name: window}.items():
        started = time.perf_counter()
        with torch.no_grad(), patchattn.patched(model, recipe):
            out = model.generate(ids, **greedy)
        seconds = time.perf_counter() - started
        runs[name] = (out.sequences[0, prompt_len:], cache_bytes(hf.output_cache(out)), seconds)

    reference = runs["dense"][0]
    print(f"prompt {prompt_len} tokens, {args.new} new tokens, greedy\n")
    print(f"| run | s (prefill + decode) | KV MiB at end | first token differing from dense | distinct tokens in the last 256 |")
    print("|---|---|---|---|---|")
    for name, (tokens, kv, seconds) in runs.items():
        differs = (tokens != reference).nonzero()
        first = "none" if differs.numel() == 0 else str(int(differs[0]))
        print(f"| {name} | {seconds:.0f} | {kv / 2**20:.1f} | {first} | {len(set(tokens[-256:].tolist()))} |")
    for name, (tokens, _, _) in runs.items():
        print(f"\n--- {name}: last 300 characters\n{tokenizer.decode(tokens)[-300:]}")


if __name__ == "__main__":
    main()
