"""Calibrating to a loss bound: the bound's parsing, the search's bracket, verification on held-out text, the lengths a
recipe is verified at, the dense path below them, and eval's default lengths."""

import logging
import math

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from patchattn.calibrate import calibrate
from patchattn.calibrate import verify as verify_module
from patchattn.calibrate.search import SEARCH_MAX_STEPS, LossBound, search_target
from patchattn.calibrate.verify import HeldOut, Verifier, lengths_to_verify, split_text
from patchattn.errors import OptionError
from patchattn.patch import patched
from patchattn.recipe import Recipe


@pytest.mark.parametrize("text, value", [("ppl=2%", 0.02), ("ppl=0.025", 0.025), ("2.5%", 0.025), (" ppl = 10% ", 0.10)])
def test_loss_bound_reads_a_perplexity_rise(text, value):
    assert LossBound.parse(text).ppl == pytest.approx(value)


@pytest.mark.parametrize("text", ["ppl=150%", "ppl=0%", "ppl=-1%", "accuracy=2%", "two percent", "ppl=1.5"])
def test_loss_bound_refuses_what_it_cannot_read(text):
    with pytest.raises(OptionError) as info:
        LossBound.parse(text)
    assert info.value.option == "max_loss" and "ppl=2%" in str(info.value) or "below 100%" in str(info.value)


def test_loss_bound_may_also_bound_the_probes_answers():
    bound = LossBound.parse("ppl=2%, answer=0.5")
    assert (bound.ppl, bound.answer) == (0.02, 0.5) and bound.to_dict() == {"ppl": 0.02, "answer": 0.5}
    assert LossBound.parse(str(bound)) == bound and LossBound.parse("2%").to_dict() == {"ppl": 0.02}
    for text in ("answer=0.5", "ppl=2%,answer=0", "ppl=2%,answer=1,answer=2", "ppl=2%,recall=1"):
        with pytest.raises(OptionError) as info:
            LossBound.parse(text)
        assert info.value.option == "max_loss"


@pytest.mark.parametrize("threshold", [0.0, 0.13, 0.5, 0.777, 0.93, 0.99])
def test_search_brackets_the_largest_target_within_the_bound_and_stops(threshold):
    """With a loss that grows with the target, every target found within the bound lies below every one found over
    it, the answer is the largest one within it (to the search's resolution), and the search stops."""
    bound = 0.02
    loss = lambda t: bound * (t / threshold) ** 3 if threshold else 1.0  # noqa: E731  (== bound at the threshold)
    calls = []

    def measure(target):
        calls.append(target)
        return target, loss(target)

    found, steps = search_target(measure, bound)
    assert len(steps) == len(calls) <= SEARCH_MAX_STEPS
    within = [s.target for s in steps if s.within]
    over = [s.target for s in steps if not s.within]
    assert not within or not over or max(within) < min(over)
    assert found == (max(within) if within else 0.0)
    assert loss(found) <= bound if found else True
    if threshold >= 0.95:
        assert found >= 0.95 - 0.025 and all(s.within for s in steps)  # every candidate within: up to the ceiling
    elif threshold:
        assert threshold - 0.95 / 2 ** (SEARCH_MAX_STEPS - 1) <= found <= threshold
    else:
        assert found == 0.0 and not within  # unreachable: dense, every measured target over the bound


def test_search_with_a_noisy_loss_returns_only_what_it_measured_within():
    """Noise may break the loss's order; what is returned was still measured within the bound."""
    g = torch.Generator().manual_seed(0)
    noisy = lambda t: 0.03 * t + 0.01 * float(torch.rand((), generator=g))  # noqa: E731
    seen = {}

    def measure(target):
        seen[target] = noisy(target)
        return target, seen[target]

    found, steps = search_target(measure, 0.02)
    assert found == 0.0 or seen[found] <= 0.02


def _model_and_text(n_scored=1024):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 4 * n_scored), generator=torch.Generator().manual_seed(1))
    return model, ids[:, :n_scored], HeldOut(ids[:, n_scored:], ids[:, :1], "test text")


def test_calibrate_to_a_loss_bound_writes_the_sparsest_verified_recipe(monkeypatch):
    """A random tiny model loses nothing to sparsity on random tokens, so each measured loss gets a penalty growing with
    the sparsity that really ran: the search must bisect, and what is written must be what was measured."""
    monkeypatch.setattr(verify_module, "MIN_VERIFY_TOKENS", 256)
    real_loss = Verifier.loss

    def penalised(self, recipe, length, bound=None):
        rise, sparsity, scored = real_loss(self, recipe, length)
        return rise + 0.1 * max(0.0, (sparsity or 0.0) - 0.3), sparsity, scored

    monkeypatch.setattr(Verifier, "loss", penalised)
    model, ids, held = _model_and_text(512)
    seen = []
    recipe = calibrate(model, ids, max_loss="ppl=2%", held_out=held, block_size=32, on_search=seen.append)
    cal = recipe.calibration
    assert cal["max_loss"] == {"ppl": 0.02} and cal["verified_on"] == "test text"
    assert [s["target"] for s in cal["search"]] == [round(s.target, 6) for s in seen] and len(seen) > 2
    within = [s for s in cal["search"] if s["within"]]
    assert within and not all(s["within"] for s in cal["search"])
    best = max(within, key=lambda s: s["target"])
    assert cal["target_sparsity"] == pytest.approx(best["target"], abs=1e-6)
    assert cal["achieved_sparsity"] == pytest.approx(best["sparsity"], abs=1e-5)
    # what was written is what was measured: the same loss when verified again
    again = Verifier(model, held).loss(recipe, 512)[0]
    assert again == pytest.approx(best["ppl_loss"], abs=1e-5) and again <= 0.02
    rows = cal["verified"]
    assert [r["length"] for r in rows] == [512, 256] and rows[0]["within"]
    sparse = [r["length"] for r in rows if r["sparse"]]
    assert recipe.min_sparse_tokens == min(sparse)
    assert all(r["within"] for r in rows if r["sparse"])
    assert recipe.verified_lengths() == sorted(sparse)
    loaded = Recipe.from_dict(recipe.to_dict())
    assert loaded.verified_lengths() == sorted(sparse) and loaded.min_sparse_tokens == recipe.min_sparse_tokens


def test_an_unreachable_bound_gives_the_dense_recipe_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(Verifier, "loss", lambda self, recipe, length, bound=None: (0.5, 0.5, length))
    model, ids, held = _model_and_text(512)
    with caplog.at_level(logging.WARNING):
        recipe = calibrate(model, ids, max_loss="ppl=1%", held_out=held, block_size=32)
    assert all(h.strategy == "dense" for layer in recipe.layers for h in layer)
    assert recipe.calibration["verified"] == [] and not any(s["within"] for s in recipe.calibration["search"])
    steps = recipe.calibration["search"]
    assert len(steps) <= SEARCH_MAX_STEPS and min(s["target"] for s in steps) < 0.025  # narrowed down to dense
    assert "no sparse recipe kept perplexity within ppl=1%" in caplog.text


def test_target_and_bound_are_one_choice():
    model, ids, held = _model_and_text(512)
    with pytest.raises(OptionError, match="give one of them"):
        calibrate(model, ids, target_sparsity=0.5, max_loss="ppl=2%")
    assert calibrate(model, ids, block_size=32).calibration["target_sparsity"] == 0.85  # the library's fixed default


def test_lengths_to_verify_halve_down_to_the_floor():
    assert lengths_to_verify(8192) == [8192, 4096, 2048, 1024]
    assert lengths_to_verify(8192, min_sparse_tokens=3000) == [8192, 4096]
    assert lengths_to_verify(1024) == [1024]
    assert lengths_to_verify(512, block_size=64) == [512]


def test_verifier_measures_the_rise_over_dense_on_windows_that_start_like_prompts():
    model, _, held = _model_and_text()
    windows = held.windows(512, 3)
    assert len(windows) == 3 and all(w.shape == (1, 512) and int(w[0, 0]) == int(held.prefix[0, 0]) for w in windows)
    assert not torch.equal(windows[0], windows[1])
    dense = Recipe.uniform(model.config, "dense", block_size=32)
    rise, sparsity, scored = Verifier(model, held, tokens=1024).loss(dense, 512)
    assert abs(rise) < 1e-4 and scored == 2 * 511
    streaming = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    from patchattn.eval.tasks import token_nll

    rise, sparsity, _ = Verifier(model, held, tokens=1024).loss(streaming, 512)
    d = sum(float(token_nll(model, w).double().sum()) for w in windows[:2])
    with patched(model, streaming):
        s = sum(float(token_nll(model, w).double().sum()) for w in windows[:2])
    assert rise == pytest.approx(math.exp((s - d) / 1022) - 1, rel=1e-6) and sparsity > 0.4


def test_split_text_holds_out_what_it_does_not_score():
    tok = byte_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 100
    ids, held = split_text(tok, text, 1024)
    assert ids.shape == (1, 1024) and held.ids.shape[1] == len(tok(text).input_ids) - 1024 and "held-out" in held.source
    ids, held = split_text(tok, text[:1500], 1024)
    assert "scored calibration tokens themselves" in held.source
    with pytest.raises(OptionError, match="more than the calibration text"):
        split_text(tok, text[:500], 1024)


def test_a_prompt_under_min_sparse_tokens_prefills_densely_and_says_so_once(caplog):
    model = tiny_model("llama")
    recipe = Recipe.uniform(model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    recipe.min_sparse_tokens, recipe.name = 512, "short-is-dense"
    ids = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        with caplog.at_level(logging.WARNING), patched(model, recipe):
            first, second = model(ids).logits, model(ids).logits
    assert torch.allclose(first, dense, atol=1e-5) and torch.allclose(second, dense, atol=1e-5)
    said = [r for r in caplog.records if "min_sparse_tokens" in r.getMessage()]
    assert len(said) == 1 and "256-token prompt" in said[0].getMessage() and "short-is-dense" in said[0].getMessage()


def test_with_probes_each_candidate_records_its_answer_drop_and_the_answer_bound_decides(monkeypatch):
    """Each candidate within the perplexity bound is run on the probes; its answers' drop is recorded, and with an
    answer bound a candidate that keeps perplexity but loses the answers is over the bound."""
    from patchattn.calibrate import answers as answers_module
    from patchattn.calibrate.probe import needle_probes

    monkeypatch.setattr(verify_module, "MIN_VERIFY_TOKENS", 256)
    monkeypatch.setattr(Verifier, "loss", lambda self, recipe, length, bound=None: (0.0, 0.5, length))  # perplexity holds
    sparsity = lambda recipe: 1.0 - sum(h.density for layer in recipe.layers for h in layer) / sum(map(len, recipe.layers))  # noqa: E731
    real_drop = answers_module.AnswerCheck.drop
    measured = []

    def drop(self, recipe):
        measured.append(real_drop(self, recipe))  # the real measurement runs (dense scored once, then the recipe)
        return 2.0 * sparsity(recipe)

    monkeypatch.setattr(answers_module.AnswerCheck, "drop", drop)
    model, ids, held = _model_and_text(512)
    probes = needle_probes(byte_tokenizer(), ids, 1)
    free = calibrate(model, ids, max_loss="ppl=2%", held_out=held, block_size=32, probes=probes)
    bounded = calibrate(model, ids, max_loss="ppl=2%,answer=0.5", held_out=held, block_size=32, probes=probes)
    assert measured and all(math.isfinite(m) for m in measured)
    assert all("answer_drop" in s and s["within"] for s in free.calibration["search"])
    steps = bounded.calibration["search"]
    assert bounded.calibration["max_loss"] == {"ppl": 0.02, "answer": 0.5}
    assert all(s["within"] == (s["answer_drop"] <= 0.5) for s in steps) and not all(s["within"] for s in steps)
    assert bounded.calibration["target_sparsity"] < free.calibration["target_sparsity"]
    assert 2.0 * bounded.calibration["achieved_sparsity"] <= 0.5 + 1e-3
    with pytest.raises(OptionError, match="no probes run"):
        calibrate(model, ids, max_loss="ppl=2%,answer=0.5", held_out=held, block_size=32)
