"""Calibration on several kinds of text: the robust allocation (worst or mean utility over kinds), per-kind records,
the loss bound decided by the worst kind, and where the texts come from (files and shipped kinds)."""

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from patchattn.calibrate import calibrate
from patchattn.calibrate import verify as verify_module
from patchattn.calibrate.kinds import kind_stats, robust_scores
from patchattn.calibrate.capture import Scores
from patchattn.calibrate.texts import calibration_texts, tokenize_texts
from patchattn.calibrate.verify import HeldOut, Verifier
from patchattn.errors import OptionError
from patchattn.recipe import Recipe


def synthetic(utility, density=((0.2, 1.0), (0.2, 1.0))):
    """One free layer, two heads, two candidates (sparse, dense)."""
    utility = torch.tensor([utility], dtype=torch.float32)
    density = torch.tensor([density], dtype=torch.float32)
    return Scores([0], 1, [None], ["sparse", "dense"], density, utility.clone(), 1.0 - utility, utility, 8, 0, {})


def test_the_worst_case_allocation_gives_the_dense_budget_to_the_head_one_kind_needs():
    """Budget for one dense head. Head 0 is fine sparse on prose but loses 0.7 on code; head 1 loses 0.5 on both.
    Worst case: head 0 (0.7 > 0.5) goes dense; mean: head 1 (0.5 > 0.35)."""
    per_kind = {"prose": synthetic(((1.0, 1.0), (0.5, 1.0))), "code": synthetic(((0.3, 1.0), (0.5, 1.0)))}
    target = 0.4  # mean density 0.6: one head dense (1.0), one sparse (0.2)
    worst = robust_scores(per_kind, "worst").choose(target)
    mean = robust_scores(per_kind, "mean").choose(target)
    assert worst.tolist() == [[1, 0]] and mean.tolist() == [[0, 1]]
    assert per_kind["prose"].choose(target).tolist() == [[0, 1]]  # prose alone would starve head 0 too
    one = {"prose": per_kind["prose"]}
    assert robust_scores(one, "worst") is per_kind["prose"]  # one kind: its own scores, unchanged


def test_kind_stats_give_each_kinds_sparsity_under_its_own_densities():
    """block_topk's density depends on the text: the same choice is sparser on one kind than another, and the
    allocation's density is their mean."""
    per_kind = {"a": synthetic(((0.9, 1.0), (0.9, 1.0)), density=((0.1, 1.0), (0.1, 1.0))),
                "b": synthetic(((0.9, 1.0), (0.9, 1.0)), density=((0.3, 1.0), (0.3, 1.0)))}
    scores = robust_scores(per_kind, "worst")
    choice = torch.tensor([[0, 0]])
    texts = {"a": torch.zeros(1, 256, dtype=torch.long), "b": torch.zeros(1, 256, dtype=torch.long)}
    stats = kind_stats(texts, per_kind, choice, {}, {"a": "a.txt"})
    assert stats == {"a": {"text": "a.txt", "scored_tokens": 256, "achieved_sparsity": 0.9},
                     "b": {"text": "b", "scored_tokens": 256, "achieved_sparsity": 0.7}}
    assert scores.sparsity(choice) == pytest.approx(0.8)


def two_kinds(n=512):
    g = torch.Generator().manual_seed(3)
    prose = torch.randint(0, 128, (1, 3 * n), generator=g)  # two different "kinds": disjoint byte ranges
    code = torch.randint(128, 256, (1, 3 * n), generator=g)
    ids = {"prose": prose[:, :n], "code": code[:, :n]}
    held = {"prose": HeldOut(prose[:, n:], prose[:, :1], "prose text"), "code": HeldOut(code[:, n:], code[:, :1], "code text")}
    return ids, held


def test_calibrate_on_two_kinds_records_each_kind():
    model = tiny_model("llama")
    ids, _ = two_kinds()
    recipe = calibrate(model, ids, target_sparsity=0.6, block_size=32, text_name={"prose": "p.txt", "code": "c.txt"})
    cal = recipe.calibration
    assert cal["robust"] == "worst" and cal["text"] == "p.txt; c.txt"
    assert set(cal["kinds"]) == {"prose", "code"}
    assert all(k["scored_tokens"] == 512 and 0.0 < k["achieved_sparsity"] < 1.0 and "ppl_loss" not in k for k in cal["kinds"].values())
    # the allocation's density is the kinds' mean, so its sparsity is the mean of theirs
    mean = sum(k["achieved_sparsity"] for k in cal["kinds"].values()) / 2
    assert cal["achieved_sparsity"] == pytest.approx(mean, abs=2e-6) and cal["achieved_sparsity"] == pytest.approx(0.6, abs=0.02)
    assert Recipe.from_dict(recipe.to_dict()).calibration["kinds"] == cal["kinds"]
    # one kind in a dict allocates as that text alone does
    alone = calibrate(model, ids["code"], target_sparsity=0.6, block_size=32)
    one = calibrate(model, {"code": ids["code"]}, target_sparsity=0.6, block_size=32)
    assert one.to_dict()["layers"] == alone.to_dict()["layers"] and "kinds" not in alone.calibration


@pytest.mark.parametrize("bad, fragment", [
    ({}, "non-empty dict"),
    ({"a": torch.zeros(1, 512, dtype=torch.long), "b": torch.zeros(1, 256, dtype=torch.long)}, "one seq_len long"),
])
def test_texts_of_unequal_length_or_none_are_refused(bad, fragment):
    with pytest.raises(OptionError, match=fragment) as info:
        calibrate(tiny_model("llama"), bad, block_size=32)
    assert info.value.option == "input_ids"


def test_held_out_must_match_the_kinds():
    ids, held = two_kinds(256)
    with pytest.raises(OptionError, match="one HeldOut per kind") as info:
        calibrate(tiny_model("llama"), ids, max_loss="ppl=2%", held_out=held["prose"], block_size=32)
    assert info.value.option == "held_out"
    with pytest.raises(OptionError, match="one HeldOut per kind"):
        calibrate(tiny_model("llama"), ids["prose"], max_loss="ppl=2%", held_out=held, block_size=32)
    with pytest.raises(OptionError, match="robust must be one of worst, mean"):
        calibrate(tiny_model("llama"), ids, robust="best", block_size=32)


def test_with_a_loss_bound_the_worst_kind_decides(monkeypatch):
    """Code loses four times what prose does at the same sparsity: prose alone would go up to the search's ceiling;
    with both, the bound holds on code, and every step, verified length and per-kind record says so."""
    monkeypatch.setattr(verify_module, "MIN_VERIFY_TOKENS", 256)
    rate = {"prose text": 0.02, "code text": 0.08}

    def loss(self, recipe, length, bound=None):
        sparsity = 1.0 - sum(h.density for layer in recipe.layers for h in layer) / sum(len(layer) for layer in recipe.layers)
        return rate[self.held.source] * sparsity, sparsity, length

    monkeypatch.setattr(Verifier, "loss", loss)
    model = tiny_model("llama")
    ids, held = two_kinds()
    prose_only = calibrate(model, ids["prose"], max_loss="ppl=2%", held_out=held["prose"], block_size=32)
    assert all(s["within"] for s in prose_only.calibration["search"]) and prose_only.calibration["target_sparsity"] > 0.92

    recipe = calibrate(model, ids, max_loss="ppl=2%", held_out=held, block_size=32, robust="mean", verify="held-out")
    cal = recipe.calibration
    assert cal["verified_on"] == "prose: prose text; code: code text" and cal["robust"] == "mean"
    for step in cal["search"] + cal["verified"]:
        by_kind = step["ppl_loss_by_kind"]
        assert step["ppl_loss"] == by_kind["code"]
        assert step["within"] == (by_kind["code"] <= 0.02)
        if step["within"]:  # measured on every kind
            assert by_kind["code"] == pytest.approx(4 * by_kind["prose"], abs=1e-5)
    # once code had broken the bound it went first, and a candidate over the bound on code skipped prose
    assert any(set(step["ppl_loss_by_kind"]) == {"code"} for step in cal["search"] if not step["within"])
    assert len(cal["search"]) > 2 and cal["achieved_sparsity"] <= 0.25 + 1e-6
    kinds = cal["kinds"]
    assert kinds["code"]["ppl_loss"] == cal["verified"][0]["ppl_loss_by_kind"]["code"] <= 0.02
    assert kinds["prose"]["ppl_loss"] == pytest.approx(kinds["code"]["ppl_loss"] / 4, abs=1e-5)


def test_the_worst_kind_goes_first_and_a_candidate_over_the_bound_stops_there():
    """Each kind's verifier is asked worst-first (by its latest loss); the first over the bound ends the measurement,
    and only what was measured is reported. The windows are shared out over the kinds, at least one each."""
    from patchattn.calibrate.kinds import WorstKind, windows_per_kind

    assert [windows_per_kind(n) for n in (1, 2, 3, 5)] == [4, 2, 2, 1]
    held = {k: HeldOut(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long), k) for k in ("a", "b", "c")}
    verifier = WorstKind(None, held)
    assert {v.n_windows for v in verifier.kinds.values()} == {2}
    asked = []

    def fake(kind, rate):
        class Fake:
            def loss(self, recipe, length, bound=None):
                asked.append(kind)
                return rate * recipe, 0.5, length

        return Fake()

    verifier.kinds = {"a": fake("a", 0.001), "b": fake("b", 0.004), "c": fake("c", 0.002)}
    assert verifier.loss(1, 64, bound=0.01)[0] == 0.004 and asked == ["a", "b", "c"]  # within: every kind, in order
    asked.clear()
    rise, sparsity, scored = verifier.loss(5, 64, bound=0.01)  # b is worst now: asked first, over the bound, done
    assert asked == ["b"] and rise == pytest.approx(0.02) and scored == 64 and verifier.loss_detail() == {"ppl_loss_by_kind": {"b": 0.02}}
    asked.clear()
    assert verifier.loss(5, 64)[0] == pytest.approx(0.02) and asked == ["b", "c", "a"]  # no bound: every kind


def test_files_and_shipped_kinds_become_kinds(tmp_path):
    (tmp_path / "notes.txt").write_text("Some notes. " * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("Other notes. " * 100)
    (tmp_path / "code.txt").write_text("x = 1\n" * 100)
    texts = calibration_texts([tmp_path / "notes.txt", tmp_path / "sub" / "notes.txt", tmp_path / "code.txt"], ["code"])
    assert [t.kind for t in texts] == ["notes", "notes-2", "code-2", "code"]
    assert texts[-1].source == "patchattn:code-calibration" and texts[-1].shipped
    tok = byte_tokenizer()
    ids, held, names = tokenize_texts(tok, texts, 512)
    assert {k: v.shape for k, v in ids.items()} == {k: (1, 512) for k in names}
    assert all("held-out tokens of the calibration text" in held[k].source for k in ("notes", "code"))
    one, one_held, name = tokenize_texts(tok, texts[:1], 512)  # one file: the single-text form, as before
    assert one.shape == (1, 512) and isinstance(one_held, HeldOut) and name == str(tmp_path / "notes.txt")
    with pytest.raises(OptionError, match=r"1024 is more than .*code.txt's 600 tokens") as info:
        tokenize_texts(tok, texts, 1024)
    assert info.value.option == "seq_len"
    for kinds, fragment in [(["prose", "prose"], "names prose twice"), (["bogus"], "names unknown bogus"), ([], "needs at least one")]:
        with pytest.raises(OptionError, match=fragment):
            calibration_texts([], kinds)


def test_unseen_kind_verifies_each_kind_on_a_recipe_allocated_without_it(monkeypatch):
    """verify="unseen-kind": at every target the search measures code under the recipe allocated on prose alone and
    prose under code's, then (where that is within the bound) each under the recipe written, allocated on both; the
    record says so."""
    monkeypatch.setattr(verify_module, "MIN_VERIFY_TOKENS", 256)
    seen = []

    def loss(self, recipe, length, bound=None):
        seen.append((self.held.source, length, recipe.to_dict()["layers"]))
        sparsity = 1.0 - sum(h.density for layer in recipe.layers for h in layer) / sum(len(layer) for layer in recipe.layers)
        return 0.04 * sparsity, sparsity, length

    monkeypatch.setattr(Verifier, "loss", loss)
    model = tiny_model("llama")
    ids, held = two_kinds()
    recipe = calibrate(model, ids, max_loss="ppl=2%", held_out=held, block_size=32, verify="unseen-kind")
    cal = recipe.calibration
    single = calibrate(model, ids["prose"], max_loss="ppl=2%", held_out=held["prose"], block_size=32)  # auto, one text
    assert "verify" not in single.calibration
    assert cal["verify"] == "unseen-kind" and cal["verified_on"].endswith("(each kind also under a recipe allocated without it)")
    search = cal["search"]
    assert len(search) > 2 and all(step["unseen"] for step in search)
    first = search[0]["target"]
    prose_alone = calibrate(model, ids["prose"], target_sparsity=first, block_size=32).to_dict()["layers"]
    code_alone = calibrate(model, ids["code"], target_sparsity=first, block_size=32).to_dict()["layers"]
    both = calibrate(model, ids, target_sparsity=first, block_size=32).to_dict()["layers"]
    assert prose_alone != code_alone or prose_alone != both  # the kinds' allocations differ from the shared one
    n_first = 4 if search[0]["within"] else 1  # within: each kind unseen, then seen; over: the first kind stops it
    at_first = [(source, layers) for source, length, layers in seen[:n_first]]
    assert at_first[0] == ("prose text", code_alone)
    if search[0]["within"]:
        assert at_first[1:] == [("prose text", both), ("code text", prose_alone), ("code text", both)]
        assert set(search[0]["unseen_ppl_loss_by_kind"]) == {"prose", "code"}
    final = calibrate(model, ids, max_loss="ppl=2%", held_out=held, block_size=32, verify="held-out")
    assert "verify" not in final.calibration
    by_default = calibrate(model, ids, max_loss="ppl=2%", held_out=held, block_size=32)  # "auto": several kinds, unseen
    assert by_default.calibration["verify"] == "unseen-kind" and by_default.calibration["search"] == cal["search"]


def test_unseen_kind_also_holds_the_bound_on_the_recipe_written(monkeypatch):
    """Where the recipe written loses more on a kind than the one allocated without it (block top-k runs denser on
    text its allocation never read), the search stops where the recipe written holds, so the calibration length is
    verified within the bound and stays sparse."""
    monkeypatch.setattr(verify_module, "MIN_VERIFY_TOKENS", 512)
    last = {}

    def loss(self, recipe, length, bound=None):
        sparsity = 1.0 - sum(h.density for layer in recipe.layers for h in layer) / sum(len(layer) for layer in recipe.layers)
        key = (self.held.source, length)
        written = last.get(key) == "unseen"  # each kind: unseen first, then (within the bound) the recipe written
        last[key] = "written" if written else "unseen"
        return (0.05 if written else 0.02) * sparsity, sparsity, length

    monkeypatch.setattr(Verifier, "loss", loss)
    ids, held = two_kinds()
    recipe = calibrate(tiny_model("llama"), ids, max_loss="ppl=2%", held_out=held, block_size=32)
    cal = recipe.calibration
    within = [step for step in cal["search"] if step["within"]]
    assert within and all(max(step["unseen_ppl_loss_by_kind"].values()) < step["ppl_loss"] for step in within)
    assert cal["achieved_sparsity"] <= 0.4 + 1e-6  # 0.05 x sparsity within 2%
    assert cal["verified"][0]["length"] == 512 and cal["verified"][0]["within"] and cal["verified"][0]["sparse"]
    assert recipe.min_sparse_tokens <= 512


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(max_loss="ppl=2%", verify="unseen-kind", single=True), "two kinds or more"),
    (dict(target_sparsity=0.5, verify="unseen-kind"), "give max_loss instead"),
    (dict(max_loss="ppl=2%", verify="unseen"), "verify must be one of auto, held-out, unseen-kind"),
])
def test_unseen_kind_verification_is_refused_where_it_cannot_run(kwargs, fragment):
    ids, held = two_kinds(256)
    single = kwargs.pop("single", False)
    texts, held_out = (ids["prose"], held["prose"]) if single else (ids, held)
    if "target_sparsity" in kwargs:
        held_out = None
    with pytest.raises(OptionError, match=fragment) as info:
        calibrate(tiny_model("llama"), texts, held_out=held_out, block_size=32, **kwargs)
    assert info.value.option == "verify"


def test_a_fixed_target_on_several_kinds_records_each_kinds_loss(monkeypatch):
    """With held-out text, a fixed-target calibration on several kinds measures the recipe once on each kind (no search)
    and records each kind's loss beside its sparsity; it verifies no lengths (eval's defaults are unchanged)."""
    monkeypatch.setattr(verify_module, "MIN_VERIFY_TOKENS", 256)
    ids, held = two_kinds()
    recipe = calibrate(tiny_model("llama"), ids, target_sparsity=0.5, held_out=held, block_size=32)
    cal = recipe.calibration
    measured = cal["measured"]
    assert measured["length"] == 512 and set(measured["ppl_loss_by_kind"]) == {"prose", "code"}
    assert measured["ppl_loss"] == max(measured["ppl_loss_by_kind"].values())
    assert {k: v["ppl_loss"] for k, v in cal["kinds"].items()} == measured["ppl_loss_by_kind"]
    assert "verified" not in cal and "search" not in cal and recipe.verified_lengths() == []
    assert cal["verified_on"] == "prose: prose text; code: code text"
    assert Recipe.from_dict(recipe.to_dict()).calibration["measured"] == measured


def test_a_kind_the_verification_skipped_has_no_loss_rather_than_zero():
    """The verification stops at the first kind over the bound; a kind it never measured is recorded as None (shown
    as "-"), not as a loss of 0."""
    per_kind = {"a": synthetic(((0.9, 1.0), (0.9, 1.0))), "b": synthetic(((0.9, 1.0), (0.9, 1.0)))}
    texts = {k: torch.zeros(1, 256, dtype=torch.long) for k in per_kind}
    choice = torch.tensor([[0, 0]])
    quality = {"max_loss": {"ppl": 0.02}, "verified": [{"length": 256, "ppl_loss_by_kind": {"b": 0.05}}]}
    stats = kind_stats(texts, per_kind, choice, quality, {})
    assert stats["b"]["ppl_loss"] == 0.05 and stats["a"]["ppl_loss"] is None
    dense = kind_stats(texts, per_kind, choice, {"max_loss": {"ppl": 0.02}, "verified": []}, {})
    assert dense["a"]["ppl_loss"] == 0.0  # a dense recipe: no loss anywhere
