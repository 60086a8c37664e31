"""Passkey, teacher-forced: the log-probability a recipe leaves the right passkey after the prompt, against dense.

A generated passkey answer costs a prefill plus a reply per prompt and scores 0 or 1; this scores each prompt in one
forward over prompt + " <passkey>" (the answer's tokens fed, as teacher forcing does), and reports per variant the mean
log-probability of the answer's tokens, the share of prompts whose every answer token is the argmax (what greedy
decoding would reproduce, given the prompt), and the prefill sparsity. The prompts are `patchattn eval`'s passkey task
(repeated filler, seeded as eval seeds them). ``--dense`` adds, for each recipe, a copy with some of its heads dense.

    python passkey_tf.py MODEL.gguf RECIPE.json [RECIPE.json ...] --trials 16 --length 8192 [--dense strategy=streaming]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

import patchattn
from patchattn.eval.runner import task_prompts
from patchattn.models import load_model
from patchattn.recipe import Recipe
from patchattn.stats import record_sparsity


def densified(recipe: Recipe, spec: str) -> Recipe:
    """A copy of ``recipe`` with the heads ``spec`` names dense ('strategy=NAME', 'layers=A-B')."""
    from patchattn.recipe import HeadPlan

    what, value = spec.split("=")
    lo, hi = (int(x) for x in value.split("-")) if what == "layers" else (0, 0)
    copy = Recipe.from_dict(recipe.to_dict())
    for li, layer in enumerate(copy.layers):
        for h, plan in enumerate(layer):
            if (what == "strategy" and plan.strategy == value) or (what == "layers" and lo <= li <= hi):
                layer[h] = HeadPlan("dense", {}, density=1.0)
    return copy


def score(model, tokenizer, prompts, recipe) -> dict:
    logps, exact, sparsity = [], 0, []
    for p in prompts:
        answer = tokenizer(" " + p.answers[0], add_special_tokens=False).input_ids
        ids = torch.tensor([p.input_ids + answer])
        with torch.no_grad(), (patchattn.patched(model, recipe, backend="sparse") if recipe else contextlib.nullcontext()), \
                record_sparsity() as rec:
            logits = model(ids).logits[0, -len(answer) - 1 : -1].float().log_softmax(-1)
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
                        "'strategy=NAME' or 'layers=A-B' (repeatable: one variant each)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    prompts = task_prompts("passkey", tokenizer, args.length, None, args.trials, 0)
    variants = [("dense", None)]
    for path in args.recipes:
        recipe = Recipe.load(path)
        variants.append((recipe.name, recipe))
        for spec in args.dense:
            variants.append((f"{recipe.name} {spec} dense", densified(recipe, spec)))
    base = None
    for name, recipe in variants:
        start = time.time()
        result = score(model, tokenizer, prompts, recipe)
        base = base or result
        flips = sum(1 for a, b in zip(base["per_prompt"], result["per_prompt"]) if b < a - 1.0)
        print(f"{name:48s} logp {result['logp']:7.3f} ({result['logp'] - base['logp']:+.3f})  exact {result['exact']:.2f}  "
              f"sparsity {result['sparsity']:.3f}  prompts down >1 nat {flips}  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
