"""Does a query block that misses the key block before it lose the single needle? (issue 21, CPU, 2026-12-08)

Every layout keeps its diagonal block, not the one before it, so a query at the start of a block may not see the
token before it. This prints, per layer and head of a recipe, the share of query blocks whose layout leaves out
the block before (on the first prompt given) and scores the prompts as passkey_tf.py does with the recipe as it is
and with every such block put back (layer_layout wrapped here, for this diagnosis only).

    python prev_block.py MODEL.gguf RECIPE.json 1,41,56,67 [VARIANTS: 2 = without dense]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import passkey_tf  # noqa: E402

import patchattn.prefill as prefill  # noqa: E402
from patchattn.eval.runner import task_prompts  # noqa: E402
from patchattn.models import context_length, load_model  # noqa: E402
from patchattn.recipe import Recipe  # noqa: E402

FORCE = {"on": False}
MISSING: list[list[float]] = []  # per layer call: the share of query blocks without the block before, per head
_layer_layout = prefill.layer_layout


def layer_layout(plan, query, key, block_size, finished=True, columns=False):
    out = _layer_layout(plan, query, key, block_size, finished=finished, columns=columns)
    keep = out[0] if columns else out
    n = keep.shape[-1]
    if keep.shape[-2] == n and n > 1:
        before = keep.diagonal(offset=-1, dim1=-2, dim2=-1)  # (B, H, n - 1): query block b, key block b - 1
        MISSING.append((1 - before.float().mean(dim=(0, 2))).tolist())
        if FORCE["on"]:
            idx = torch.arange(1, n, device=keep.device)
            keep[..., idx, idx - 1] = True
    return out


def main() -> None:
    prefill.layer_layout = layer_layout
    torch.set_num_threads(2)
    gguf, recipe_path, which = sys.argv[1], sys.argv[2], sys.argv[3]
    model, tokenizer = load_model(gguf, dtype="float32", device="cpu")
    prompts = task_prompts("single", tokenizer, 8192, context_length(model.config), 68, 1)
    prompts = [prompts[int(i)] for i in which.split(",")]
    recipe = Recipe.load(recipe_path)
    variants = [("recipe", recipe, False), ("recipe + block before", recipe, True), ("dense", None, False)]
    for name, rec, force in variants[: int(sys.argv[4]) if len(sys.argv) > 4 else 3]:
        FORCE["on"] = force
        MISSING.clear()
        start = time.time()
        r = passkey_tf.score(model, tokenizer, prompts, rec)
        print(f"{name:28s} logp {r['logp']:.3f} exact {r['exact']:.2f} sparsity {r['sparsity']:.4f} "
              f"per {r['per_prompt']} ({time.time() - start:.0f} s)", flush=True)
        if MISSING and not force:
            for li, shares in enumerate(MISSING[: len(recipe.layers)]):
                print(f"  layer {li:2d} missing prev block share per head: " + " ".join(f"{x:.2f}" for x in shares))


if __name__ == "__main__":
    main()
