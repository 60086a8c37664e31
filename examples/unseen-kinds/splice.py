"""Build `gpu-sweep/spliced.json` again, from the two calibrated recipes it was cut from (issue 21).

The splice is not a calibration. It takes sweep row 19's recipe (`gpu-sweep/vs-in-0-4.json`: vertical-slash offered in
layers 0-4 only, which keeps eval's passkey) and puts in layers 12-20 of the shipped `s72-spread` recipe (vertical-slash
everywhere, which keeps email), except:

- L12H1 stays row 19's block top-k head (with it, no vertical-slash head is left between layers 5 and 16);
- L17H3, L18H6 and L20H4, the heads email's quoted replies read through, become `vertical_slash_topk`: `s72-spread`'s
  vertical and diagonal budgets with row 19's block top-k threshold for the same head.

Each layer keeps row 19's ``min_sparse_tokens`` (its break-even on the H100 it was calibrated on). With ``--measured
RESULTS`` (a ``patchattn eval`` results.json with ``--ppl-text`` of each shipped kind's held-out text and of the
unseen kinds) the recipe's ``calibration`` records the loss and sparsity measured per text in place of row 19's, and
its ``achieved_sparsity`` is the mean measured over the shipped kinds (row 19's per-layer totals are left out).

    python examples/unseen-kinds/splice.py -o spliced.json [--measured results.json]

`tests/test_shipped_recipes.py` holds `gpu-sweep/spliced.json`'s layers to what this builds. It is the record of an
experiment: `calibrate --layer-budgets kept` with the splice's layer rule now finds a recipe that meets the same bar
(`recipes/smollm2-135m-instruct-8k-s72-kept.json`).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from patchattn.text import KINDS as SHIPPED_KINDS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BASE = HERE / "gpu-sweep" / "vs-in-0-4.json"
DONOR = ROOT / "recipes" / "smollm2-135m-instruct-8k-s72-spread.json"
DONOR_LAYERS = range(12, 21)
KEEP_BASE = {(12, 1)}
UNION = ((17, 3), (18, 6), (20, 4))
NOTE = ("vs-in-0-4 (sweep row 19) with layers 12-20 of s72-spread, except L12H1 from vs-in-0-4 and L17H3, L18H6, "
        "L20H4 as vertical_slash_topk (s72-spread's vertical-slash budgets, vs-in-0-4's block top-k thresholds); built "
        "by hand on 2026-12-07 to test on the GPU, not by calibrate")
NAME = "smollm2-135m-instruct-8k-s72-spliced"
KINDS = tuple(SHIPPED_KINDS)


def splice(base: dict, donor: dict) -> dict:
    """The spliced recipe as a dict (``base`` and ``donor`` are left as they are)."""
    out = copy.deepcopy(base)
    out["name"] = NAME
    for li in DONOR_LAYERS:
        heads = out["layers"][li]["heads"]
        for hi, head in enumerate(donor["layers"][li]["heads"]):
            if (li, hi) not in KEEP_BASE:
                heads[hi] = copy.deepcopy(head)
        if "kv_heads" in donor["layers"][li]:
            out["layers"][li]["kv_heads"] = copy.deepcopy(donor["layers"][li]["kv_heads"])
    for li, hi in UNION:
        vs, topk = donor["layers"][li]["heads"][hi], base["layers"][li]["heads"][hi]
        if vs["strategy"] != "vertical_slash_spread" or topk["strategy"] != "block_topk":
            raise SystemExit(f"L{li}H{hi}: expected vertical_slash_spread and block_topk, found {vs['strategy']} "
                             f"and {topk['strategy']}")
        out["layers"][li]["heads"][hi] = {"strategy": "vertical_slash_topk",
                                          "params": {**vs["params"], "threshold": topk["params"]["threshold"]}}
    out["calibration"]["spliced"] = NOTE
    return out


def record_measured(recipe: dict, results: dict) -> None:
    """Replace row 19's per-kind record by what ``results`` (eval's results.json) measured with this recipe."""
    ours = [v for v, meta in results["variants"].items() if not meta.get("dense") and "uniform" not in meta]
    if len(ours) != 1:
        raise SystemExit(f"expected one recipe besides dense and uniform twins in the results, found {ours}")
    variant = ours[0]
    rows = [r for r in results["results"] if r["task"].startswith("ppl")]
    by = {(r["task"], r["variant"]): r for r in rows}
    texts = {"prose": "ppl"} | {Path(t["path"]).stem: f"ppl:{t['name']}" for t in results["ppl_texts"]}

    def loss(task: str) -> tuple[float, float]:
        dense, ours = by[(task, "dense")], by[(task, variant)]
        return round(ours["value"] / dense["value"] - 1, 6), round(ours["sparsity"], 6)

    cal = recipe["calibration"]
    kinds, unseen = {}, {}
    for name, task in texts.items():
        ppl_loss, sparsity = loss(task)
        entry = {"ppl_loss": ppl_loss, "achieved_sparsity": sparsity, "tokens": by[(task, "dense")]["prompt_tokens"][0]}
        if name in KINDS:
            kinds[name] = {**cal["kinds"][name], **entry}
        else:
            unseen[name] = entry
    missing = [k for k in KINDS if k not in kinds]
    if missing:
        raise SystemExit(f"{', '.join(missing)}: no held-out perplexity in the results; pass --ppl-text for each kind")
    env = results["environment"]
    cal["kinds"] = kinds
    cal["measured"] = {"length": results["lengths"][0], "ppl_loss": max(k["ppl_loss"] for k in kinds.values()),
                       "sparsity": round(sum(k["achieved_sparsity"] for k in kinds.values()) / len(kinds), 6),
                       "ppl_loss_by_kind": {k: v["ppl_loss"] for k, v in kinds.items()},
                       "unseen": unseen,
                       "on": f"one {results['lengths'][0]}-token window of each text, {env['device']} "
                             f"({env['dtype']}, torch {env['torch']}, transformers {env['transformers']}), "
                             f"{results['created'][:10]}"}
    cal["verified_on"] = "the held-out text of each shipped kind, one window each (patchattn eval --ppl-text)"
    # row 19's own totals do not describe the splice: its sparsity is the one measured, the rest is left out
    cal["achieved_sparsity"] = cal["measured"]["sparsity"]
    for stale in ("layer_density", "mean_kept_mass", "mean_output_error"):
        cal.pop(stale, None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--measured", type=Path, help="eval's results.json for this recipe (see the module's docstring)")
    args = ap.parse_args(argv)
    recipe = splice(json.loads(BASE.read_text()), json.loads(DONOR.read_text()))
    if args.measured:
        record_measured(recipe, json.loads(args.measured.read_text()))
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(recipe, indent=1) + "\n")
    tmp.replace(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
