"""Passkey, teacher-forced: the log-probability a recipe leaves the right passkey after the prompt, against dense.

A generated passkey answer costs a prefill plus a reply per prompt and scores 0 or 1; this scores each prompt with the
answer's tokens fed (teacher forcing) and reports per variant the mean log-probability of the answer's tokens, the
share of prompts whose every answer token is the argmax (what greedy decoding would reproduce, given the prompt), and
the prefill sparsity. The prompts are `patchattn eval`'s passkey task (repeated filler, seeded and limited to the
model's context as eval does; runs before 2026-12-07 afternoon drew other prompts of the same task).
``--dense`` adds, for each recipe, a copy with some of its heads dense (by strategy, layer range or layer:head).
``--task`` reads another of eval's needle tasks (its first answer), ``--seed`` eval's seed, ``--prompts`` only some of
the trials (their indices, as eval numbers them).

``--read`` says how the answer is read:
- ``gen`` (default): the prompt prefilled, then the answer fed through the cache, as generation reads it. The prompt's
  last query block is dense in every layout and decode on the full cache is dense, so what a recipe loses here comes
  from the sparse prefill of the prompt's own positions.
- ``tf``: one forward over prompt + answer. The row predicting the first answer token then sits in a sparse query
  block, which generation never has. It is not the test generation sets: on SmolLM2 at 8K (H100, bfloat16) the
  needle-checked 72% recipe read +0.22 nats this way over the first six prompts and −1.06 by ``gen`` on the same six;
  over 30 prompts, −0.87 and −1.15 (``gpu-8k-s72/needles/``). Six prompts are also too few.

    python passkey_tf.py MODEL.gguf RECIPE.json [RECIPE.json ...] --trials 16 --length 8192 [--dense strategy=streaming]
        [--read gen|tf] [--device cuda --dtype bfloat16] [--task single --seed 1 --prompts 1,41,49]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

import patchattn
from patchattn.eval.runner import task_prompts
from patchattn.models import context_length, load_model
from patchattn.recipe import Recipe
from patchattn.stats import record_sparsity


def densified(recipe: Recipe, spec: str) -> Recipe:
    """A copy of ``recipe`` with the heads ``spec`` names dense ('strategy=NAME', 'layers=A-B', 'heads=L:H,L:H')."""
    from patchattn.recipe import HeadPlan

    what, value = spec.split("=")
    lo, hi = (int(x) for x in value.split("-")) if what == "layers" else (0, 0)
    heads = {tuple(int(x) for x in lh.split(":")) for lh in value.split(",")} if what == "heads" else set()
    copy = Recipe.from_dict(recipe.to_dict())
    for li, layer in enumerate(copy.layers):
        for h, plan in enumerate(layer):
            if (what == "strategy" and plan.strategy == value) or (what == "layers" and lo <= li <= hi) or (li, h) in heads:
                layer[h] = HeadPlan("dense", {}, density=1.0)
    return copy


def score(model, tokenizer, prompts, recipe, read: str = "gen") -> dict:
    from patchattn.calibrate.probe import continuation_logits

    device = model.get_input_embeddings().weight.device
    logps, exact, sparsity = [], 0, []
    for p in prompts:
        answer = tokenizer(" " + p.answers[0], add_special_tokens=False).input_ids
        with torch.no_grad(), (patchattn.patched(model, recipe, backend="sparse") if recipe else contextlib.nullcontext()), \
                record_sparsity() as rec:
            if read == "gen":
                out = model(torch.tensor([p.input_ids], device=device), use_cache=True, logits_to_keep=1)
                logits = continuation_logits(model, out, torch.tensor([answer], device=device)).log_softmax(-1).cpu()
            else:
                ids = torch.tensor([p.input_ids + answer], device=device)
                logits = model(ids).logits[0, -len(answer) - 1 : -1].float().log_softmax(-1).cpu()
        target = torch.tensor(answer)
        logps.append(float(logits.gather(-1, target[:, None]).sum()))
        exact += bool((logits.argmax(-1) == target).all())
        sparsity.append(rec.sparsity or 0.0)
    return {"logp": sum(logps) / len(logps), "exact": exact / len(prompts), "sparsity": sum(sparsity) / len(sparsity),
            "per_prompt": [round(x, 3) for x in logps]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("recipes", nargs="*")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--dense", action="append", default=[], help="also each recipe with these heads dense: "
                        "'strategy=NAME', 'layers=A-B' or 'heads=L:H,L:H' (repeatable: one variant each)")
    parser.add_argument("--read", choices=("gen", "tf"), default="gen", help="how the answer is read (module text)")
    parser.add_argument("--task", default="passkey", help="eval's needle task whose prompts are read")
    parser.add_argument("--seed", type=int, default=0, help="eval's --seed")
    parser.add_argument("--prompts", default="", help="comma-separated trial indices to read (default: all --trials)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    # the model's context limit, as eval passes it: the draws depend on it (before 2026-12-07 afternoon this passed
    # None, so its prompts were other draws of the same task, not eval's)
    prompts = task_prompts(args.task, tokenizer, args.length, context_length(model.config), args.trials, args.seed)
    if args.prompts:
        prompts = [prompts[int(i)] for i in args.prompts.split(",")]
    variants = [("dense", None)]
    for path in args.recipes:
        recipe = Recipe.load(path)
        variants.append((recipe.name, recipe))
        for spec in args.dense:
            variants.append((f"{recipe.name} {spec} dense", densified(recipe, spec)))
    base = None
    for name, recipe in variants:
        start = time.time()
        result = score(model, tokenizer, prompts, recipe, args.read)
        base = base or result
        flips = sum(1 for a, b in zip(base["per_prompt"], result["per_prompt"]) if b < a - 1.0)
        print(f"{name:48s} logp {result['logp']:7.3f} ({result['logp'] - base['logp']:+.3f})  exact {result['exact']:.2f}  "
              f"sparsity {result['sparsity']:.3f}  prompts down >1 nat {flips}  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
