"""lm-eval glue: patchattn's tasks as lm-eval task directories, runs through HFLM dense and patched that match
patchattn's own eval reply for reply, option parsing and errors; one slow test on the real SmolLM2."""

from __future__ import annotations

import json
import sys

import pytest

from patchattn.errors import PatchattnError
from patchattn.eval import lmeval
from patchattn.eval.haystack import score
from patchattn.eval.runner import run_eval, task_prompts
from patchattn.recipe import Recipe

pytest.importorskip("lm_eval")
# a tiny random Llama and BPE tokenizers with a BOS (and a chat template), built offline
from test_eval import chat_tokenizer, plain_tokenizer, tiny_model  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.internals  # CI runs these on the oldest supported transformers too

LENGTH = 400


def _task(task_dir, name):
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    if hasattr(manager, "load"):  # lm-eval >= 0.4.12
        return manager, manager.load([name])["tasks"][name]
    return manager, get_task_dict([name], manager)[name]


def test_task_dir_holds_patchattn_prompts_as_lm_eval_tasks(tmp_path, chat_tokenizer):
    """Every task loads through lm-eval's TaskManager (the tag too); its docs are the own eval's prompts; each
    request is the prompt text with that prompt's token budget; the copied scorer scores as patchattn does."""
    task_dir = lmeval.write_task_dir(chat_tokenizer, LENGTH, tmp_path / "tasks", trials=3, seed=1)
    manager, task = _task(task_dir, "patchattn_multikey")
    names = {lmeval.lm_eval_name(t) for t in lmeval.NEEDLE_TASKS}
    assert names <= set(manager.all_tasks) and "patchattn" in manager.all_tasks
    prompts = task_prompts("multikey", chat_tokenizer, LENGTH, None, 3, 1)
    docs = list(task.test_docs())
    assert [d["input"] for d in docs] == [p.text for p in prompts]
    for doc, prompt in zip(docs, prompts):
        context = task.doc_to_text(doc)
        assert context == prompt.text and chat_tokenizer(context, add_special_tokens=False)["input_ids"] == prompt.input_ids
        (request,) = [task.construct_requests(doc, context)]
        assert request.arguments[0] == prompt.text
        assert request.arguments[1]["max_gen_toks"] == prompt.max_new_tokens and request.arguments[1]["until"] == []
        for reply in (f" {prompt.answers[0]}.", " 1234567 then " + prompt.answers[0], ""):
            assert task.process_results(doc, [reply]) == {"acc": score(prompt, reply)}
    assert json.loads((task_dir / "patchattn_multikey.jsonl").read_text().splitlines()[0])["prompt_tokens"] == prompts[0].length_tokens
    with pytest.raises(ValueError, match="unknown patchattn task"):
        lmeval.write_task_dir(chat_tokenizer, LENGTH, tmp_path / "x", tasks=["nope"])


def test_lm_eval_matches_own_eval_dense_and_patched(tmp_path, tiny_model, chat_tokenizer):
    """Through HFLM, dense and patched, every reply is the one patchattn's own eval gets on the same prompt."""
    recipe = Recipe.uniform(tiny_model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64, name="stream")
    variants = {"dense": None, "stream": recipe}
    steps = []
    rows = lmeval.run_lm_eval(
        tiny_model, chat_tokenizer, variants, ["patchattn_passkey"], [LENGTH], work_dir=tmp_path, trials=3,
        options={"limit": 2}, progress=lambda advance, description: steps.append(advance),
    )
    assert steps.count(1) == lmeval.lm_eval_steps(variants, [LENGTH], ["patchattn_passkey"]) == 2
    own = run_eval(tiny_model, chat_tokenizer, variants, [LENGTH], tasks=["passkey"], trials=2)["results"]
    by_variant = {row["variant"]: row for row in rows}
    assert set(by_variant) == {"dense", "stream"}
    for own_row in own:
        row = by_variant[own_row["variant"]]
        assert (row["task"], row["metric"], row["length"], row["trials"]) == ("lmeval:patchattn_passkey", "acc", LENGTH, 2)
        assert 0.0 <= row["value"] <= 1.0 and row["value"] == own_row["value"]
        assert row["replies"] == own_row["replies"] and row["scores"] == own_row["scores"]
        assert row["prompt_tokens"] == own_row["prompt_tokens"]
    assert by_variant["dense"]["sparsity"] == 0.0 and by_variant["stream"]["sparsity"] > 0.3
    assert by_variant["dense"]["replies"] != by_variant["stream"]["replies"]  # the patch really ran under lm-eval


def test_options_and_task_names():
    assert lmeval.parse_options("limit=5, num_fewshot=0,batch_size=2,system_instruction=be brief") == {
        "limit": 5, "num_fewshot": 0, "batch_size": 2, "system_instruction": "be brief"}
    assert lmeval.parse_options('{"gen_kwargs": {"max_gen_toks": 8, "until": ["\\n"]}}') == {"gen_kwargs": {"max_gen_toks": 8, "until": ["\n"]}}
    assert lmeval.parse_options("") == {}
    model_kwargs, evaluate_kwargs = lmeval.split_options({"limit": 2, "batch_size": 4, "max_length": 4096, "gen_kwargs": "temperature=0"})
    assert model_kwargs == {"batch_size": 4, "max_length": 4096} and evaluate_kwargs == {"limit": 2, "gen_kwargs": "temperature=0"}
    for bad, message in (("limit", "key=value"), ("{1", "not valid JSON")):
        with pytest.raises(PatchattnError, match=message):
            lmeval.parse_options(bad)
    for bad, message in (({"model": "x"}, "set by patchattn"), ({"limt": 2}, "unknown option 'limt'")):
        with pytest.raises(PatchattnError, match=message):
            lmeval.split_options(bad)
    ours, others = lmeval.split_task_names(["patchattn_single", "hellaswag", "patchattn", "hellaswag"])
    assert ours == ["single", "passkey", "multikey", "multivalue", "multiquery", "vartrack"] and others == ["hellaswag"]
    with pytest.raises(lmeval.UnknownLmEvalTaskError, match="patchattn_passkey"):
        lmeval.split_task_names(["patchattn_pasky"])


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(lmeval.LmEvalMissingError, match=r"pip install 'patchattn\[lmeval\]'"):
        lmeval.check_tasks(["patchattn_passkey"])


def test_cli_lm_eval_tasks(tmp_path, tiny_model_dir):
    """`patchattn eval --lm-eval-tasks` adds lm-eval rows to the report; an unknown task fails in one line first."""
    from typer.testing import CliRunner

    from conftest import tiny_model as tiny_llama
    from patchattn.cli import app

    recipe = tmp_path / "stream.json"
    Recipe.uniform(tiny_llama("llama").config, "streaming", block_size=32, sink_tokens=32, window_tokens=64).save(recipe)
    common = [str(tiny_model_dir), "-r", str(recipe), "-l", "512", "--tasks", "passkey", "--trials", "1", "--speed-runs", "0"]
    result = CliRunner().invoke(app, ["eval", *common, "--lm-eval-tasks", "patchattn_vartrack", "--lm-eval-args", "limit=1", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = [r for r in results["results"] if r["task"] == "lmeval:patchattn_vartrack"]
    assert [r["variant"] for r in rows] == ["dense", "stream"] and results["complete"] and results["lm_eval"]["tasks"] == ["patchattn_vartrack"]
    assert "lmeval:patchattn_vartrack" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "lm_eval_tasks" / "512" / "patchattn_vartrack.jsonl").exists()
    bad = CliRunner().invoke(app, ["eval", *common, "--lm-eval-tasks", "no_such_task_xyz", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "lm-eval does not know the task(s) no_such_task_xyz" in bad.output
    assert not (tmp_path / "bad" / "results.json").exists()


@pytest.mark.slow
def test_real_model_dense_accuracy_equals_own_eval(smollm, tmp_path):
    """SmolLM2 dense, passkey at 2K: lm-eval through HFLM gives patchattn's own accuracy and the same replies."""
    model, tokenizer = smollm
    own = run_eval(model, tokenizer, {"dense": None}, [2048], tasks=["passkey"], trials=2)["results"][0]
    (row,) = lmeval.run_lm_eval(model, tokenizer, {"dense": None}, ["patchattn_passkey"], [2048], work_dir=tmp_path, trials=2)
    assert own["value"] == row["value"] == 1.0
    assert row["replies"] == own["replies"] and row["prompt_tokens"] == own["prompt_tokens"]


def test_lm_eval_cli_runs_an_exported_patched_model(tmp_path, tiny_model, chat_tokenizer):
    """`python -m patchattn.lm_eval_cli` is lm-eval's own command line (what `accelerate launch -m` starts once per GPU)
    in a process that registered patchattn: it loads a directory from `patchattn export`, whose config names the
    "patchattn" attention, and scores patchattn's task on it; plain lm-eval cannot load that directory."""
    import subprocess

    from patchattn.export import export

    recipe = Recipe.uniform(tiny_model.config, "streaming", block_size=32, sink_tokens=32, window_tokens=64, name="stream")
    patched_dir = export(tiny_model, chat_tokenizer, recipe, tmp_path / "patched")
    task_dir = lmeval.write_task_dir(chat_tokenizer, LENGTH, tmp_path / "tasks", tasks=["passkey"], trials=2, seed=1)
    args = ["--model", "hf", "--model_args", f"pretrained={patched_dir},dtype=float32", "--tasks", "patchattn_passkey",
            "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "out")]
    run = subprocess.run([sys.executable, "-m", "patchattn.lm_eval_cli", *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results*.json")
    result = json.loads(result_file.read_text())
    assert "acc,none" in result["results"]["patchattn_passkey"]
    plain = subprocess.run([sys.executable, "-m", "lm_eval", *args[:-1], str(tmp_path / "plain")], capture_output=True, text=True, timeout=600)
    assert plain.returncode != 0 and "patchattn" in plain.stdout + plain.stderr
