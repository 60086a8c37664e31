"""The CLI end to end on tiny local models: happy paths and every kind of bad input.

Bad input must give one readable line, a non-zero exit code, no traceback, and no half-written file.
"""

import json
import math

import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from typer.testing import CliRunner

from patchattn.cli import app
from patchattn.recipe import Recipe

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_clean_error(result, *fragments):
    assert result.exit_code != 0
    text = result.output
    assert "Traceback" not in text
    error_lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, text
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


@pytest.fixture
def calibration_text(tmp_path):
    from patchattn.text import load_text

    path = tmp_path / "text.txt"
    path.write_text(load_text("calibration")[:20000])
    return path


@pytest.mark.internals
def test_calibrate_then_export_then_load(tiny_model_dir, calibration_text, tmp_path):
    recipe_path = tmp_path / "out" / "my.json"
    result = invoke("calibrate", tiny_model_dir, "--target-sparsity", 0.7, "--seq-len", 1024, "--block-size", 32,
                    "--text", calibration_text, "-o", recipe_path, "--baseline-output", tmp_path / "out" / "uniform.json",
                    "--kv-budget", 0.5, "--probes", 1)
    assert result.exit_code == 0, result.output
    recipe = Recipe.load(recipe_path)
    assert abs(recipe.calibration["achieved_sparsity"] - 0.7) <= 0.02
    assert recipe.calibration["probe"]["prompts"] == 1 and len(recipe.calibration["probe"]["layer_weight"]) == len(recipe.layers)
    assert "answer" in result.output and "NLL" in result.output and "rise of the text" in result.output
    assert recipe.kv_layers is not None and recipe.calibration["kv"]["achieved"] <= 0.5 + 1e-6
    assert "KV cache: budget 0.5" in result.output
    assert (tmp_path / "out" / "my.png").stat().st_size > 1000
    assert Recipe.load(tmp_path / "out" / "uniform.json").name == "uniform"
    assert "achieved" in result.output

    out_dir = tmp_path / "patched"
    result = invoke("export", tiny_model_dir, "--recipe", recipe_path, "-o", out_dir)
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "recipe.json", "README.md", "tokenizer.json"} <= {p.name for p in out_dir.iterdir()}

    import patchattn
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(0))
    model, _ = patchattn.load(out_dir, device="cpu")  # the reference runs on the CPU
    plain = AutoModelForCausalLM.from_pretrained(out_dir)
    reference = tiny_model("llama")
    with torch.no_grad(), patchattn.patched(reference, recipe):
        expected = reference(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
        torch.testing.assert_close(plain(ids).logits, expected)


def test_unknown_model(tmp_path):
    result = invoke("calibrate", "nobody/no-such-model-xyz", "-o", tmp_path / "r.json")
    assert_clean_error(result, "not found")
    assert not (tmp_path / "r.json").exists()


def test_missing_gguf(tmp_path):
    assert_clean_error(invoke("calibrate", tmp_path / "model.gguf", "-o", tmp_path / "r.json"), "does not exist")


def test_unsupported_architecture(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    path = tmp_path / "mamba"
    MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=256, state_size=4)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    result = invoke("calibrate", path, "-o", tmp_path / "r.json")
    assert_clean_error(result, "attention registry")
    assert not (tmp_path / "r.json").exists()


def test_short_calibration_writes_a_recipe_that_loads(tiny_model_dir, calibration_text, tmp_path):
    """At 256 tokens in blocks of 32 the early query blocks of a token-column candidate hold most of their causal
    blocks already: every candidate's density stays a share of dense work, and the recipe written loads."""
    result = invoke("calibrate", tiny_model_dir, "--seq-len", 256, "--block-size", 32, "--target-sparsity", 0.5,
                    "--text", calibration_text, "--strategies", "dense,streaming,vertical_slash_tokens,block_topk",
                    "-o", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    candidates = Recipe.load(tmp_path / "r.json").calibration["candidates"]
    assert any(c["strategy"] == "vertical_slash_tokens" for c in candidates)
    assert all(0.0 <= c["mean_density"] <= 1.0 and 0.0 <= c["mean_kept_mass"] <= 1.0 for c in candidates), candidates


def test_calibrate_runs_the_needle_check_by_default_and_refuses_one_that_cannot_fit(tiny_model_dir, calibration_text, tmp_path):
    args = ("calibrate", tiny_model_dir, "--block-size", 32, "--target-sparsity", 0.5, "--text", calibration_text)
    result = invoke(*args, "--seq-len", 512, "-o", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    needles = Recipe.load(tmp_path / "r.json").calibration["needles"]
    assert needles["prompts"] == 2 and needles["rows"] > 0
    assert "needles:" in result.output and "still stream" in result.output
    # too short for a needle and its question: the default says so and calibrates without; asked for, a clear error
    result = invoke(*args, "--seq-len", 256, "-o", tmp_path / "short.json")
    assert result.exit_code == 0, result.output
    assert "no needle check" in result.output and "needles" not in Recipe.load(tmp_path / "short.json").calibration
    result = invoke(*args, "--seq-len", 256, "--needles", 2, "-o", tmp_path / "asked.json")
    assert result.exit_code == 2 and "too short for the needle check" in result.output and "--needles 0" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "asked.json").exists()
    result = invoke(*args, "--seq-len", 512, "--needles", 0, "-o", tmp_path / "none.json")
    assert result.exit_code == 0 and "needles" not in Recipe.load(tmp_path / "none.json").calibration


def test_recipe_for_another_model(tiny_model_dir, tmp_path):
    other = Recipe.uniform(tiny_model("gpt2").config, "dense")
    other.save(tmp_path / "gpt2.json")
    result = invoke("export", tiny_model_dir, "--recipe", tmp_path / "gpt2.json", "-o", tmp_path / "out")
    assert_clean_error(result, "another model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,fragment", [("{not json", "not valid JSON"), (json.dumps({"schema_version": 0}), "schema version 0")])
def test_corrupt_or_old_recipe(tiny_model_dir, tmp_path, content, fragment):
    (tmp_path / "bad.json").write_text(content)
    result = invoke("export", tiny_model_dir, "--recipe", tmp_path / "bad.json", "-o", tmp_path / "out")
    assert_clean_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_prompt_longer_than_context(tiny_model_dir, calibration_text, tmp_path):
    result = invoke("calibrate", tiny_model_dir, "--seq-len", 4096, "--text", calibration_text, "-o", tmp_path / "r.json")
    assert_clean_error(result, "4096", "context of 2048")
    assert not (tmp_path / "r.json").exists()


def test_bad_kv_budget(tiny_model_dir, calibration_text, tmp_path):
    result = invoke("calibrate", tiny_model_dir, "--seq-len", 512, "--text", calibration_text, "--kv-budget", 2, "-o", tmp_path / "r.json")
    assert_clean_error(result, "--kv-budget must be a finite number in (0, 1]")
    assert not (tmp_path / "r.json").exists()


def test_negative_probes(tiny_model_dir, calibration_text, tmp_path):
    result = invoke("calibrate", tiny_model_dir, "--seq-len", 512, "--text", calibration_text, "--probes", -1, "-o", tmp_path / "r.json")
    assert_clean_error(result, "--probes must be an integer >= 0")
    assert not (tmp_path / "r.json").exists()


def test_unwritable_output(tiny_model_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("calibrate", tiny_model_dir, "-o", blocker / "r.json")
    assert_clean_error(result, "cannot write")
    assert blocker.read_text() == "x"


@pytest.mark.internals
def test_a_model_with_its_own_windows_calibrates_exports_and_loads(calibration_text, tmp_path):
    """Gemma 3 (a sliding-window layer and a full one): calibrate says the window layer keeps the model's window, and
    the exported directory loads back patched, the window applied by patchattn, with the patched model's logits."""
    model_dir = tmp_path / "tiny-gemma3"
    tiny_model("gemma3").save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    recipe_path = tmp_path / "g.json"
    result = invoke("calibrate", model_dir, "--target-sparsity", 0.6, "--seq-len", 1024, "--block-size", 32,
                    "--text", calibration_text, "-o", recipe_path, "--probes", 0,
                    "--no-break-even")  # on a GPU the break-even column would wrap the strategies column's text
    assert result.exit_code == 0, result.output
    assert "own window of 48" in result.output
    recipe = Recipe.load(recipe_path)
    assert recipe.calibration["model_windows"] == {"0": 48} and abs(recipe.calibration["achieved_sparsity"] - 0.6) <= 0.02
    out_dir = tmp_path / "patched"
    assert invoke("export", model_dir, "--recipe", recipe_path, "-o", out_dir).exit_code == 0

    import patchattn

    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(0))
    model, _ = patchattn.load(out_dir, device="cpu")
    reference = tiny_model("gemma3")
    with torch.no_grad(), patchattn.patched(reference, recipe):
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, expected)


def test_export_refuses_non_empty_dir(tiny_model_dir, tmp_path):
    Recipe.uniform(tiny_model("llama").config, "dense").save(tmp_path / "r.json")
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = invoke("export", tiny_model_dir, "--recipe", tmp_path / "r.json", "-o", target)
    assert_clean_error(result, "not empty")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_debug_shows_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "calibrate", "nobody/no-such-model-xyz", "-o", str(tmp_path / "r.json")])
    assert result.exit_code != 0 and result.exception is not None


def test_eval_end_to_end_and_too_long(tiny_model_dir, tmp_path):
    recipe = Recipe.uniform(tiny_model("llama").config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    recipe.save(tmp_path / "r.json")
    out = tmp_path / "results"
    result = invoke("eval", tiny_model_dir, "--recipe", tmp_path / "r.json", "--lengths", 600, "--tasks", "ppl,passkey",
                    "--trials", 1, "--speed-runs", 1, "-o", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    rows = {(r["task"], r["variant"]): r for r in data["results"]}
    assert set(rows) == {(task, v) for task in ("ppl", "passkey", "speed") for v in ("dense", "r")}  # speed in every run
    assert rows[("ppl", "r")]["sparsity"] > 0.3 and rows[("ppl", "dense")]["sparsity"] == 0.0
    assert rows[("speed", "r")]["ms_per_token"] > 0 and data["speed_runs"] == 1
    for name in ("results.md", "results.png", "accuracy_vs_sparsity.png", "speed_vs_length.png", "report.html"):
        assert (out / name).exists()
    assert "Speed and memory" in result.output and "results/report.html" in result.output  # Rich tables, where it is

    result = invoke("eval", tiny_model_dir, "--recipe", tmp_path / "r.json", "--lengths", 4096, "-o", tmp_path / "r2")
    assert_clean_error(result, "4096", "2048")
    assert not (tmp_path / "r2" / "results.json").exists()


def test_eval_interrupted_keeps_finished_rows(tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C mid-run: the rows finished so far are on disk, readable, and the message says where."""
    import patchattn.eval.runner as runner_mod

    recipe = Recipe.uniform(tiny_model("llama").config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    recipe.save(tmp_path / "r.json")
    calls = []
    real_answer = runner_mod.answer

    def answer_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # dense's passkey row is done, the patched one is under way
            raise KeyboardInterrupt
        return real_answer(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "answer", answer_then_interrupt)
    out = tmp_path / "results"
    result = invoke("eval", tiny_model_dir, "--recipe", tmp_path / "r.json", "--lengths", 300, "--tasks", "ppl,passkey",
                    "--trials", 2, "-o", out)
    assert result.exit_code == 130
    assert_clean_error(result, "interrupted", "3 result row(s)", str(out))
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is False and len(data["results"]) == 3
    assert "Partial results" in (out / "results.md").read_text()


def test_eval_ppl_windows(tiny_model_dir, tmp_path):
    """--ppl-windows N: perplexity over N windows of held-out text, the first being the one-window run's text; the
    value is the perplexity of all their tokens (the windows' geometric mean). 0 is refused before anything runs."""
    recipe = Recipe.uniform(tiny_model("llama").config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    recipe.save(tmp_path / "r.json")
    runs = {}
    for windows in (1, 3):
        out = tmp_path / f"w{windows}"
        result = invoke("eval", tiny_model_dir, "--recipe", tmp_path / "r.json", "--lengths", 300, "--tasks", "ppl",
                        "--speed-runs", 0, "--ppl-windows", windows, "-o", out)
        assert result.exit_code == 0, result.output
        data = json.loads((out / "results.json").read_text())
        assert data["ppl_windows"] == windows
        runs[windows] = {r["variant"]: r for r in data["results"]}
    for variant in ("dense", "r"):
        one, three = runs[1][variant], runs[3][variant]
        assert len(three["scores"]) == 3 and len(set(three["scores"])) == 3  # three different texts
        assert three["scores"][0] == pytest.approx(one["value"], rel=1e-6)
        assert three["value"] == pytest.approx(math.exp(sum(math.log(x) for x in three["scores"]) / 3), rel=1e-9)
    result = invoke("eval", tiny_model_dir, "--recipe", tmp_path / "r.json", "--ppl-windows", 0, "-o", tmp_path / "bad")
    assert_clean_error(result, "--ppl-windows")
    assert not (tmp_path / "bad").exists()


def test_eval_ppl_text(tiny_model_dir, tmp_path):
    """--ppl-text FILE: perplexity on the user's own text beside the held-out prose, per variant and length, in
    results.json and the report's per-text table; a text too short for every length is refused once the tokenizer is
    there, before anything runs or is written."""
    from patchattn.text import load_text

    recipe = Recipe.uniform(tiny_model("llama").config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    recipe.save(tmp_path / "r.json")
    (tmp_path / "mine.txt").write_text(load_text("calibration")[:2000])
    out = tmp_path / "out"
    result = invoke("eval", tiny_model_dir, "-r", tmp_path / "r.json", "-l", 300, "--tasks", "ppl", "--speed-runs", 0,
                    "--ppl-text", tmp_path / "mine.txt", "-o", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["ppl_texts"] == [{"name": "mine", "path": str(tmp_path / "mine.txt"), "tokens": 2000, "skipped_lengths": []}]
    rows = {(r["task"], r["variant"]): r for r in data["results"]}
    assert set(rows) == {(task, v) for task in ("ppl", "ppl:mine") for v in ("dense", "r")}
    sparsity = rows[("ppl:mine", "r")]["sparsity"]
    assert sparsity > 0.2 and sparsity == pytest.approx(rows[("ppl", "r")]["sparsity"])  # streaming: by length only
    assert rows[("ppl:mine", "dense")]["prompt_tokens"] == [300] and rows[("ppl:mine", "dense")]["text"] == str(tmp_path / "mine.txt")
    assert "Perplexity per text" in result.output and "## Perplexity per text" in (out / "results.md").read_text()

    (tmp_path / "short.txt").write_text("Too short. " * 10)
    result = invoke("eval", tiny_model_dir, "-r", tmp_path / "r.json", "-l", 300, "--tasks", "ppl", "--speed-runs", 0,
                    "--ppl-text", tmp_path / "short.txt", "-o", tmp_path / "bad")
    assert_clean_error(result, "--ppl-text", "short.txt is 110 tokens under this tokenizer, shorter than the shortest eval length (300")
    assert not (tmp_path / "bad").exists()


@pytest.mark.internals
def test_eval_of_exported_dir_compares_with_dense(tiny_model_dir, tmp_path):
    recipe = Recipe.uniform(tiny_model("llama").config, "streaming", block_size=32, sink_tokens=32, window_tokens=32)
    recipe.save(tmp_path / "r.json")
    assert invoke("export", tiny_model_dir, "--recipe", tmp_path / "r.json", "-o", tmp_path / "exp").exit_code == 0
    result = invoke("eval", tmp_path / "exp", "--lengths", 512, "--tasks", "ppl", "--speed-runs", 0, "-o", tmp_path / "res")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "res" / "results.json").read_text())
    ppl = {r["variant"]: r for r in data["results"]}
    assert set(ppl) == {"dense", "streaming"}
    assert ppl["dense"]["sparsity"] == 0.0 and ppl["streaming"]["sparsity"] > 0.5
    assert ppl["dense"]["value"] != ppl["streaming"]["value"]


def test_device_map_places_the_model_through_accelerate(tiny_model_dir, tmp_path, monkeypatch):
    """--device-map reaches from_pretrained (accelerate places the layers: over the GPUs there are, on a CPU machine
    all on the CPU) for eval, calibrate and export alike; an unknown placement is one clear line, nothing written."""
    import transformers

    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    recipe = Recipe.uniform(tiny_model("llama").config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    recipe.save(tmp_path / "r.json")
    result = invoke("eval", tiny_model_dir, "-r", tmp_path / "r.json", "-l", 512, "--tasks", "passkey", "--trials", 1,
                    "--speed-runs", 0, "--device", "cpu", "--device-map", "auto", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert seen == ["auto"] and json.loads((tmp_path / "out" / "results.json").read_text())["complete"]
    result = invoke("export", tiny_model_dir, "-r", tmp_path / "r.json", "--device-map", "sequential", "-o", tmp_path / "exp")
    assert result.exit_code == 0, result.output
    assert seen[-1] == "sequential" and (tmp_path / "exp" / "model.safetensors").exists()
    for command in (["eval", "-r", tmp_path / "r.json"], ["export", "-r", tmp_path / "r.json"], ["calibrate"]):
        result = invoke(command[0], tiny_model_dir, *command[1:], "--device-map", "everywhere", "-o", tmp_path / "bad" / "x")
        assert_clean_error(result, "--device-map 'everywhere' unknown", "auto, balanced")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("*.json"))


def test_calibrate_writes_min_sparse_tokens(tiny_model_dir, calibration_text, tmp_path):
    out = tmp_path / "r.json"
    result = invoke("calibrate", tiny_model_dir, "-s", 0.5, "-n", 512, "--block-size", 32, "--text", calibration_text,
                    "--min-sparse-tokens", 1024, "-o", out, "--baseline-output", tmp_path / "u.json")
    assert result.exit_code == 0, result.output
    assert Recipe.load(out).min_sparse_tokens == 1024 and Recipe.load(tmp_path / "u.json").min_sparse_tokens == 1024
    result = invoke("calibrate", tiny_model_dir, "--min-sparse-tokens", -5, "-o", tmp_path / "bad.json")
    assert_clean_error(result, "--min-sparse-tokens must be an integer >= 0")
    assert not (tmp_path / "bad.json").exists()


def test_calibrate_warns_when_the_recipe_is_far_from_dense(capsys):
    """A recipe whose heads' outputs are off by more than HIGH_OUTPUT_ERROR on average gets a warning (the sparsity is
    too high for the model at this length); a close one does not."""
    from patchattn import cli

    recipe = Recipe.uniform(tiny_model("llama").config, "streaming", block_size=32, sink_tokens=32, window_tokens=64)
    for error, warned in ((0.25, True), (0.05, False)):
        recipe.calibration = {"target_sparsity": 0.8, "achieved_sparsity": 0.8, "mean_kept_mass": 0.8, "mean_output_error": error}
        cli._print_recipe(recipe)
        out = capsys.readouterr().out
        assert ("warning: the heads' attention outputs are off by 25%" in " ".join(out.split())) == warned, out


def test_calibrate_on_two_text_files_records_each_kind(tiny_model_dir, calibration_text, tmp_path):
    """Each --text file is a kind of its own, named by its stem; the table shows each kind's sparsity."""
    from patchattn.text import load_kind

    code = tmp_path / "lib.py"
    code.write_text(load_kind("code", "calibration")[:6000])
    out = tmp_path / "r.json"
    result = invoke("calibrate", tiny_model_dir, "-s", 0.5, "-n", 512, "--block-size", 32, "--text", calibration_text,
                    "--text", code, "--robust", "mean", "-o", out)
    assert result.exit_code == 0, result.output
    cal = Recipe.load(out).calibration
    assert cal["robust"] == "mean" and list(cal["kinds"]) == ["text", "lib"]
    assert cal["kinds"]["lib"]["text"] == str(code) and cal["kinds"]["text"]["scored_tokens"] == 512
    assert "per kind of text" in result.output and "lib" in result.output
    short = tmp_path / "short.txt"
    short.write_text("Too short. " * 30)
    result = invoke("calibrate", tiny_model_dir, "-n", 512, "--text", calibration_text, "--text", short, "-o", tmp_path / "bad.json")
    assert_clean_error(result, "--seq-len 512 is more than", "short.txt's 330 tokens", "shorter --seq-len")
    assert not (tmp_path / "bad.json").exists()


def test_calibrate_on_shipped_kinds_holds_the_bound_on_each(tiny_model_dir, tmp_path, monkeypatch):
    """--kinds scores each kind's calibration part and verifies on its held-out part; every search step says which kind
    was worst and the recipe records each kind's loss."""
    from patchattn.calibrate import verify as verify_module

    monkeypatch.setattr(verify_module, "MIN_VERIFY_TOKENS", 512)  # verified at the calibration length only
    out = tmp_path / "r.json"
    result = invoke("calibrate", tiny_model_dir, "--kinds", "prose,code", "-n", 512, "--block-size", 32, "--max-loss", "ppl=2%", "-o", out)
    assert result.exit_code == 0, result.output
    cal = Recipe.load(out).calibration
    assert list(cal["kinds"]) == ["prose", "code"] and cal["robust"] == "worst"
    assert cal["verify"] == "unseen-kind"  # the default with several kinds
    # each kind verified on its calibration part beyond the scored tokens: the shipped held-out parts are eval's
    assert "heldout" not in cal["verified_on"] and "code: " in cal["verified_on"]
    assert cal["kinds"]["code"]["text"] == "patchattn:code-calibration"
    # a candidate within the bound was measured on both kinds; one over it may have stopped at the first kind over it
    assert all(set(step["ppl_loss_by_kind"]) == {"prose", "code"} for step in cal["search"] if step["within"])
    assert all(step["ppl_loss_by_kind"] and max(step["ppl_loss_by_kind"].values()) > 0.02 for step in cal["search"] if not step["within"])
    assert all(step["ppl_loss"] == max(step["ppl_loss_by_kind"].values()) for step in cal["search"])
    assert all("ppl_loss" in k for k in cal["kinds"].values())
    assert "worst kind" in result.output and "per kind of text" in result.output


def test_calibrate_verifies_each_kind_unseen_when_asked(tiny_model_dir, tmp_path, monkeypatch):
    """--verify unseen-kind: every search step measured each kind under a recipe allocated without it, and the table
    says so."""
    from patchattn.calibrate import verify as verify_module

    monkeypatch.setattr(verify_module, "MIN_VERIFY_TOKENS", 512)
    out = tmp_path / "r.json"
    result = invoke("calibrate", tiny_model_dir, "--kinds", "prose,code", "-n", 512, "--block-size", 32, "--max-loss", "ppl=2%",
                    "--verify", "unseen-kind", "-o", out)
    assert result.exit_code == 0, result.output
    cal = Recipe.load(out).calibration
    assert cal["verify"] == "unseen-kind" and all(step["unseen"] for step in cal["search"])
    assert "allocated without it" in " ".join(result.output.split())


def test_calibrate_reads_every_shipped_kind_by_default(tiny_model_dir, tmp_path):
    """With neither --text nor --kinds the recipe is calibrated on all five shipped kinds, prose first."""
    out = tmp_path / "r.json"
    result = invoke("calibrate", tiny_model_dir, "-s", 0.5, "-n", 512, "--block-size", 32, "-o", out)
    assert result.exit_code == 0, result.output
    cal = Recipe.load(out).calibration
    assert list(cal["kinds"]) == ["prose", "code", "docs", "dialogue", "structured"]
    assert all(k["scored_tokens"] == 512 for k in cal["kinds"].values())
    assert "of 5 kinds of text" in result.output or "per kind of text" in result.output
