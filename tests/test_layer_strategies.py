"""--layer-strategies: a range of layers chooses among fewer strategies, within the density the allocation without rules
gives it (--layer-budgets kept, the default) or under one global budget (shared)."""

import pytest
import torch
from conftest import tiny_model
from test_cli import assert_clean_error, calibration_text, invoke  # noqa: F401  (calibration_text is a fixture)

from patchattn.calibrate import calibrate
from patchattn.calibrate.allocate import allocate
from patchattn.calibrate.layer_strategies import FORBIDDEN, LayerRule, check_layers, choose, parse_rules, restrict
from patchattn.errors import OptionError

OFFERED = ("dense", "streaming", "vertical_slash_spread", "block_topk")


def test_rules_parse_and_refuse_what_they_cannot_mean():
    assert LayerRule.parse("5-29=dense, block_topk", OFFERED) == LayerRule(5, 29, ("dense", "block_topk"))
    assert LayerRule.parse("3=streaming", OFFERED) == LayerRule(3, 3, ("streaming",))
    for spec, fragment in [("dense", "takes FIRST-LAST"), ("4-2=dense", "ends before it starts"),
                           ("1-2=vertical_slash", "names vertical_slash"), ("1-2=", "takes FIRST-LAST")]:
        with pytest.raises(OptionError, match=fragment):
            LayerRule.parse(spec, OFFERED)
    with pytest.raises(OptionError, match="overlap"):
        parse_rules(["0-3=dense", "3-5=block_topk"], OFFERED)


def test_restrict_leaves_out_the_rules_candidates_in_their_layers_only():
    utility = torch.rand(3, 2, 4)  # free layers 0, 2, 3 (layer 1 has the model's own window), 4 candidates
    names = ["dense", "streaming", "block_topk", "block_topk"]
    got = restrict(utility, [0, 2, 3], names, parse_rules(["2-3=dense,streaming"], OFFERED))
    assert torch.equal(got[0], utility[0])
    assert (got[1:, :, 2:] == FORBIDDEN).all() and torch.equal(got[1:, :, :2], utility[1:, :, :2])
    check_layers(parse_rules(["2-3=dense"], OFFERED), n_layers=4)
    with pytest.raises(OptionError, match="reaches layer 7, but the model has 4 layers"):
        check_layers(parse_rules(["5-7=dense"], OFFERED), n_layers=4)


def test_a_restricted_layer_gets_only_its_strategies_at_the_same_sparsity_under_a_shared_budget():
    ids = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    free = calibrate(tiny_model("llama"), ids, target_sparsity=0.7, block_size=32, strategies=OFFERED)
    assert {h.strategy for h in free.layers[1]} - {"dense", "streaming"}, "the rule must change something to be tested"
    ruled = calibrate(tiny_model("llama"), ids, target_sparsity=0.7, block_size=32, strategies=OFFERED,
                      layer_strategies=["1=dense,streaming"], layer_budgets="shared")
    assert {h.strategy for h in ruled.layers[1]} <= {"dense", "streaming"}
    assert ruled.calibration["layer_strategies"] == ["1=dense,streaming"] and ruled.calibration["layer_budgets"] == "shared"
    assert abs(ruled.calibration["achieved_sparsity"] - 0.7) <= 0.02


def test_kept_budgets_leave_the_other_layers_as_the_unruled_allocation_and_move_no_density():
    """Layer 1 is offered only dense and a poor cheap candidate. Sharing one budget, the allocation takes density from
    layers 0 and 2 to pay for layer 1's dense heads; kept, layers 0 and 2 are exactly the allocation without rules, and
    layer 1 chooses within the density that allocation gave it."""
    names = ["dense", "streaming", "block_topk", "block_topk"]
    density = torch.tensor([1.0, 0.1, 0.2, 0.4]).expand(3, 4, 4).clone()
    utility = torch.tensor([1.0, 0.3, 0.8, 0.95]).expand(3, 4, 4).clone()
    utility[1] = torch.tensor([1.0, 0.2, 0.9, 0.97])  # layer 1 would pick block top-k without the rule
    rules = parse_rules(["1=dense,streaming"], OFFERED)
    target = 0.4
    open_choice = allocate(density.reshape(-1, 4), utility.reshape(-1, 4), target).view(3, 4)
    shared = choose(density, utility, [0, 1, 2], names, rules, target, "shared")
    kept = choose(density, utility, [0, 1, 2], names, rules, target, "kept")
    pick = lambda choice: density.gather(-1, choice[..., None]).squeeze(-1)  # noqa: E731
    for choice in (shared, kept):
        assert set(choice[1].tolist()) <= {0, 1} and float(pick(choice).mean()) <= target + 1e-6
    assert torch.equal(kept[[0, 2]], open_choice[[0, 2]])
    assert float(pick(kept)[1].mean()) <= float(pick(open_choice)[1].mean()) + 1e-6
    assert float(pick(shared)[[0, 2]].mean()) < float(pick(open_choice)[[0, 2]].mean()), "sharing moved density"
    assert torch.equal(choose(density, utility, [0, 1, 2], names, (), target, "kept"), open_choice)


def test_calibrate_keeps_each_rules_budget_by_default_and_records_it():
    ids = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
    free = calibrate(tiny_model("llama"), ids, target_sparsity=0.7, block_size=32, strategies=OFFERED)
    kept = calibrate(tiny_model("llama"), ids, target_sparsity=0.7, block_size=32, strategies=OFFERED,
                     layer_strategies=["1=dense,streaming"])
    assert [(h.strategy, h.params) for h in kept.layers[0]] == [(h.strategy, h.params) for h in free.layers[0]]
    assert {h.strategy for h in kept.layers[1]} <= {"dense", "streaming"}
    assert kept.calibration["layer_budgets"] == "kept" and kept.calibration["achieved_sparsity"] >= 0.7 - 0.02
    with pytest.raises(OptionError, match="layer_budgets"):
        calibrate(tiny_model("llama"), ids, target_sparsity=0.7, block_size=32, layer_budgets="split")


def test_cli_refuses_a_bad_rule_before_loading_and_a_layer_past_the_model(tiny_model_dir, calibration_text, tmp_path):
    out = tmp_path / "r.json"
    result = invoke("calibrate", tiny_model_dir, "--seq-len", 512, "--text", calibration_text, "-o", out,
                    "--layer-strategies", "1-0=dense")
    assert_clean_error(result, "--layer-strategies", "ends before it starts")
    result = invoke("calibrate", tiny_model_dir, "--seq-len", 512, "--text", calibration_text, "-o", out,
                    "--target-sparsity", 0.5, "--layer-strategies", "1-9=dense")
    assert_clean_error(result, "--layer-strategies", "reaches layer 9, but the model has 2 layers")
    assert not out.exists()
