"""The recipes shipped in recipes/ (and the prose-only ones of recipes/prose-only/ that earlier reports ran): valid,
named after their file, their recorded sparsity true, fitting the embedded SmolLM2, and a patched forward on it stays
close to dense."""

from pathlib import Path

import pytest
import torch

import patchattn
from patchattn.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = sorted(ROOT.glob("*.json"))
RECIPES = SHIPPED + sorted((ROOT / "prose-only").glob("*.json"))
CALIBRATED_ON_FIVE_KINDS = ("s80", "s80-probed", "s80-blocks", "kv30", "s72-spread", "kinds")


def test_recipes_are_shipped():
    assert {"smollm2-135m-instruct-8k-s80", "smollm2-135m-instruct-8k-s80-probed"} <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("name", CALIBRATED_ON_FIVE_KINDS)
def test_shipped_calibrations_read_every_kind_and_record_each(name):
    """Issue 21: the shipped calibrations are robust over the five shipped kinds of text, with the loss and the
    sparsity measured on each kind's held-out text recorded in the recipe."""
    from patchattn.text import KINDS

    calibration = Recipe.load(ROOT / f"smollm2-135m-instruct-8k-{name}.json").calibration
    assert calibration["robust"] == "worst"
    kinds = calibration["kinds"]
    assert set(kinds) == set(KINDS)
    for kind in kinds.values():
        assert kind["scored_tokens"] >= 8192 and kind["ppl_loss"] is not None
        assert abs(kind["achieved_sparsity"] - calibration["achieved_sparsity"]) < 0.1  # each kind near the target
    if calibration["achieved_sparsity"] > 0:  # measured on each kind, not the target copied
        assert len({kind["achieved_sparsity"] for kind in kinds.values()}) == len(kinds)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_is_valid_and_true_to_its_stats(path):
    recipe = Recipe.load(path)
    assert recipe.name == path.stem
    density = recipe.mean_density
    if density is not None and "achieved_sparsity" in recipe.calibration:
        assert abs((1.0 - density) - recipe.calibration["achieved_sparsity"]) < 1e-3
        per_layer = recipe.calibration.get("layer_density")
        if per_layer:
            assert per_layer == pytest.approx([sum(h.density for h in layer) / len(layer) for layer in recipe.layers], abs=1e-4)
    probe = recipe.calibration.get("probe")
    if probe:
        assert len(probe["layer_drop"]) == len(probe["layer_weight"]) == len(recipe.layers)
        assert min(probe["layer_weight"]) >= 1.0
        from patchattn.calibrate.probe import layer_weights

        rises = probe.get("layer_nll_rise")
        expected = layer_weights(torch.tensor(probe["layer_drop"]), torch.tensor(rises) if rises is not None else None)
        # (the costs are recorded rounded, so the weights agree to rounding)
        assert probe["layer_weight"] == pytest.approx(expected.tolist(), abs=1e-2), "weights follow from the recorded costs"


def test_shipped_recipes_fit_the_embedded_model(smollm):
    model, tokenizer = smollm
    from patchattn.text import load_text

    ids = tokenizer(load_text("heldout")[:20000], return_tensors="pt").input_ids[:, :2048]
    with torch.no_grad():
        dense = model(ids).logits[0, -64:].float().log_softmax(-1)
    for path in SHIPPED:  # (the prose-only ones ran through this test as they were shipped)
        recipe = Recipe.load(path)
        recipe.check_model(model.config)
        with torch.no_grad(), patchattn.patched(model, recipe):
            patched = model(ids).logits[0, -64:].float().log_softmax(-1)
        kl = float((dense.exp() * (dense - patched)).sum(-1).mean())
        if any(h.strategy != "dense" for layer in recipe.layers for h in layer):
            assert kl > 0.0, f"{path.stem} changed nothing"
        assert kl < 0.5, f"{path.stem}: KL {kl:.3f} from dense on the last 64 tokens"


REPORT = Path(__file__).resolve().parents[1] / "examples" / "smollm2-8k-s80" / "results.json"


def test_the_8k_report_ran_the_prose_only_recipes():
    """examples/smollm2-8k-s80 (issue #2's report) ran the prose-only recipes kept in recipes/prose-only/: changing one
    of them without running the report again fails here."""
    import json

    report = json.loads(REPORT.read_text())
    assert report["complete"] and report["lengths"] == [8192] and report["trials"] == 100 and report["ppl_windows"] == 4
    names = {"smollm2-135m-instruct-8k-s80-probed", "smollm2-135m-instruct-8k-s80-uniform"}
    assert set(report["variants"]) == names | {"dense"}
    for name in names:
        recipe, info = Recipe.load(ROOT / "prose-only" / f"{name}.json"), report["variants"][name]
        assert info["strategy_counts"] == recipe.strategy_counts(), name
        assert info["block_size"] == recipe.block_size and info["calibrated_sparsity"] == recipe.calibration["achieved_sparsity"]
        if "plan_hash" in info:  # reports from before plan hashes were recorded compare by their counts
            assert info["plan_hash"] == recipe.plan_hash(), name
        if recipe.compresses_kv:
            kv = {}
            for layer in recipe.kv_plans():
                for plan in layer:
                    kv[plan.policy] = kv.get(plan.policy, 0) + 1
            assert info["kv_policy_counts"] == kv, name
    rows = {(r["task"], r["variant"]) for r in report["results"]}
    assert rows == {(t, v) for t in ("ppl", "passkey", "single") for v in names | {"dense"}}


def test_the_spliced_recipe_is_what_splice_py_builds():
    """examples/unseen-kinds/gpu-sweep/spliced.json is not a calibration but a splice of two calibrated recipes
    (examples/unseen-kinds/splice.py; calibrate --layer-budgets kept has since found a recipe as good): its layers
    must be the ones that script builds from them now."""
    import importlib.util
    import json

    root = ROOT.parent
    spec = importlib.util.spec_from_file_location("splice", root / "examples" / "unseen-kinds" / "splice.py")
    splice = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(splice)
    built = splice.splice(json.loads(splice.BASE.read_text()), json.loads(splice.DONOR.read_text()))
    recorded = json.loads((splice.HERE / "gpu-sweep" / "spliced.json").read_text())
    assert recorded["layers"] == built["layers"]
    assert recorded["calibration"]["spliced"] == splice.NOTE
    kinds = recorded["calibration"]["kinds"]
    assert set(kinds) == set(splice.KINDS)
    assert all(0.0 < k["achieved_sparsity"] < 1.0 and k["ppl_loss"] is not None for k in kinds.values())
