"""The vertical slice on the real SmolLM2-135M-Instruct: calibrate at 2K, eval at 2K."""

import pytest

from patchattn.calibrate import calibrate, tokens_from_text
from patchattn.eval.runner import run_eval
from patchattn.text import load_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recipe_2k(smollm):
    model, tokenizer = smollm
    ids = tokens_from_text(tokenizer, load_text("calibration"), 2048, model.config)
    return calibrate(model, ids, target_sparsity=0.7, block_size=64)


def test_calibration_reaches_target(recipe_2k, smollm):
    model, _ = smollm
    assert abs(recipe_2k.calibration["achieved_sparsity"] - 0.7) <= 0.02
    assert recipe_2k.model["num_layers"] == 30 and recipe_2k.model["num_kv_heads"] == 3
    assert model.config._attn_implementation == "sdpa"
    # Real attention is far from uniform: computing 30% of the blocks keeps over 80% of the mass.
    assert recipe_2k.calibration["mean_kept_mass"] > 0.8
    assert recipe_2k.calibration["mean_output_error"] < 0.15


def test_passkey_dense_and_patched(recipe_2k, smollm):
    model, tokenizer = smollm
    results = run_eval(model, tokenizer, {"dense": None, "patched": recipe_2k}, [2048], tasks=["passkey"], trials=2)
    rows = {row["variant"]: row for row in results["results"]}
    assert rows["dense"]["value"] == 1.0
    assert rows["patched"]["value"] == 1.0
    assert rows["patched"]["sparsity"] > 0.5
