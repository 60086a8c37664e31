"""Decode of a real model on a GPU: dense eager and compiled vs patched eager and graphed, and the graph's tokens.

GPU only; never part of the test suite. One prompt of held-out prose, greedy decoding, bfloat16:

* ms per generated token from :func:`patchattn.eval.tasks.measure_speed` (medians of timed ``generate`` runs after a
  warm-up that pays for compiles and captures): dense with transformers' default cache (eager) and through
  generate's compile path (``cache_implementation="static"``: ``torch.compile``); patched eager (its budgeted cache)
  and through the same switch (the whole step replayed as a CUDA graph, :mod:`patchattn.decode_graphs`);
* whether the graphed generation's ``--new-tokens`` greedy tokens equal the eager patched generation's.

    python benchmarks/decode_real.py MODEL --recipe recipes/smollm2-135m-instruct-8k-kv30.json --out real.json
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

import patchattn
from patchattn import decode_graphs
from patchattn.eval.tasks import measure_speed
from patchattn.models import load_model
from patchattn.recipe import Recipe
from patchattn.text import load_kind


def speed(model, ids, fast: bool, args) -> dict:
    result = measure_speed(model, ids, decode_tokens=args.speed_tokens, repeats=args.repeats, fast_decode=fast)
    return {"ttft_ms": result.ttft_ms, "ms_per_token": result.ms_per_token, "decode_path": result.decode_path,
            "kv_bytes": result.kv_bytes, "kv_cache": result.kv_cache, "ms_per_token_runs": result.ms_per_token_runs}


@torch.no_grad()
def same_tokens(model, ids, n_new: int) -> dict:
    """Greedy ``n_new`` tokens eagerly and through the graphs, compared."""
    prompt = torch.tensor([ids], device=model.device)
    greedy = dict(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, attention_mask=torch.ones_like(prompt),
                  pad_token_id=model.generation_config.eos_token_id or 0)
    eager = model.generate(prompt, **greedy)
    runner = decode_graphs.runner_for(model)
    before = dict(runner.paths)
    graphed = model.generate(prompt, cache_implementation="static", **greedy)
    paths = {k: n - before.get(k, 0) for k, n in runner.paths.items()}
    same = eager[0, prompt.shape[1]:] == graphed[0, prompt.shape[1]:]
    first_diff = int((~same).nonzero()[0]) if not bool(same.all()) else None
    return {"tokens": n_new, "equal": bool(same.all()), "first_difference": first_diff, "paths": paths}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[8000])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--speed-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="decode_real.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    model, tokenizer = load_model(args.model, dtype="bfloat16", device="cuda")
    recipe = Recipe.load(args.recipe)
    text_ids = tokenizer(load_kind("prose", "heldout"), add_special_tokens=False)["input_ids"]
    rows = []
    for n in args.prompt_tokens:
        ids = text_ids[:n]
        row = {"prompt_tokens": len(ids), "dense_eager": speed(model, ids, False, args), "dense_compiled": speed(model, ids, True, args)}
        with patchattn.patched(model, recipe):
            row["patched_eager"] = speed(model, ids, False, args)
            row["patched_graph"] = speed(model, ids, True, args)
            row["same_tokens"] = same_tokens(model, ids, args.new_tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "recipe": args.recipe, "rows": rows}, f, indent=1)

    print(f"\n{'prompt':>7} | {'dense eager':>12} {'dense compiled':>15} | {'patched eager':>14} {'patched graph':>14} | same tokens")
    for r in rows:
        anchor = min(r["dense_eager"]["ms_per_token"], r["dense_compiled"]["ms_per_token"])
        cell = lambda key: f"{r[key]['ms_per_token']:.2f}"  # noqa: E731
        print(f"{r['prompt_tokens']:>7} | {cell('dense_eager'):>12} {cell('dense_compiled'):>15} | {cell('patched_eager'):>14} "
              f"{cell('patched_graph') + ' ' + format(anchor / r['patched_graph']['ms_per_token'], '.2f') + 'x':>14} | "
              f"{r['same_tokens']['equal']} ({r['same_tokens']['paths']})")


if __name__ == "__main__":
    main()
