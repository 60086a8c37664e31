"""Where a recipe's chosen heads lose on kinds it never read: each head's chosen candidate scored (one calibration
scoring pass, 8K tokens) on the texts it was calibrated on and on three it never read, grouped by strategy.

    python heads_by_kind.py MODEL RECIPE OUT.json [--device cpu]

Scores come from ``patchattn.calibrate.capture.score_text`` with the recipe's own block size and strategies; every
head's plan is matched to its candidate in that grid. Per kind, the output error and kept mass of the chosen
candidates, as the allocation saw them (sampled rows, float32)."""

from __future__ import annotations

import argparse
import json

import torch

from patchattn.calibrate.capture import score_text
from patchattn.calibrate.options import CalibrationOptions
from patchattn.models import load_model
from patchattn.recipe import Recipe
from patchattn.text import load_kind

TEXTS = {"prose": ("prose", "calibration"), "code": ("code", "calibration"), "code (held-out)": ("code", "heldout"),
         "docs": ("docs", "heldout"), "dialogue": ("dialogue", "heldout"), "structured": ("structured", "heldout")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    recipe = Recipe.load(args.recipe)
    cal = recipe.calibration
    model, tokenizer = load_model(args.model, dtype="float32", device=args.device)
    options = CalibrationOptions(target_sparsity=0.5, seq_len=cal["seq_len"], block_size=recipe.block_size,
                                 strategies=tuple(cal["strategies"]), n_rows=cal.get("sampled_rows", 256))
    result = {"recipe": recipe.name, "seq_len": options.seq_len, "kinds": {}}
    for name, (kind, part) in TEXTS.items():
        ids = torch.tensor([tokenizer(load_kind(kind, part))["input_ids"][: options.seq_len]], device=model.device)
        with torch.no_grad():
            scores = score_text(model, ids, options, None)
        grid = [(c.name, c.params()) for c in scores.candidates]
        rows = []
        for fi, layer in enumerate(scores.free):
            for h, plan in enumerate(recipe.layers[layer]):
                c = grid.index((plan.strategy, dict(plan.params)))
                rows.append({"layer": layer, "head": h, "strategy": plan.strategy,
                             "error": float(scores.error[fi, h, c]), "mass": float(scores.mass[fi, h, c]),
                             "density": float(scores.density[fi, h, c])})
        result["kinds"][name] = rows
        by = {}
        for r in rows:
            by.setdefault(r["strategy"], []).append(r["error"])
        print(name, {k: f"{sum(v) / len(v):.3f} ({len(v)})" for k, v in by.items()}, flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
