"""Eval: prompt builders, tasks, runner and report, on a tiny random Llama with an offline tokenizer;
one slow test on the real SmolLM2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from patchattn.errors import InputTooLongError, OutputPathError, PatchattnError
from patchattn.eval import haystack
from patchattn.eval.haystack import BUILDERS, Prompt, build_prompt, numbers_in, score
from patchattn.eval.report import ensure_writable_dir, render_markdown, write_report
from patchattn.eval.runner import TASKS, check_lengths, eval_steps, run_eval
from patchattn.eval.tasks import perplexity, ppl_input_ids, token_nll
from patchattn.recipe import Recipe
from patchattn.text import load_text

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_tokenizer(chat: bool):
    """A small byte-level BPE trained offline on the held-out text, with a BOS the tokenizer adds itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_text("heldout")[:60_000]], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def plain_tokenizer():
    return _train_tokenizer(chat=False)


@pytest.fixture(scope="module")
def chat_tokenizer():
    return _train_tokenizer(chat=True)


@pytest.fixture(scope="module")
def tiny_model(plain_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=len(plain_tokenizer), max_position_embeddings=4096, bos_token_id=plain_tokenizer.bos_token_id,
        eos_token_id=plain_tokenizer.eos_token_id, pad_token_id=plain_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return model


# ---- prompts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(BUILDERS))
@pytest.mark.parametrize("chat", [False, True])
def test_prompt_length_answers_and_determinism(task, chat, plain_tokenizer, chat_tokenizer):
    tokenizer = chat_tokenizer if chat else plain_tokenizer
    for length in (300, 517, 1024, 3000):
        prompt = build_prompt(task, tokenizer, length, seed=3)
        assert length - haystack.LENGTH_SLACK_TOKENS <= prompt.length_tokens <= length
        assert prompt.input_ids == tokenizer(prompt.text, add_special_tokens=not chat)["input_ids"]
        for value in prompt.answers:
            assert value in prompt.text
        assert prompt.max_new_tokens > 0
        assert build_prompt(task, tokenizer, length, seed=3) == prompt
    assert build_prompt(task, tokenizer, 1024, seed=4).text != build_prompt(task, tokenizer, 1024, seed=3).text
    assert (prompt.text.startswith("<|im_start|>user") if chat else prompt.input_ids[0] == tokenizer.bos_token_id)


def test_needle_structure(plain_tokenizer):
    single = build_prompt("single", plain_tokenizer, 1500, 0)
    assert single.text.count("The special magic number for") == 2  # the needle and the question's prefix
    multikey = build_prompt("multikey", plain_tokenizer, 1500, 0)
    needles = [p for p in multikey.text.split("\n\n") if p.startswith("The special magic number for") and " is: " in p]
    assert len(needles) == 2 and len({n.split(" is: ")[0] for n in needles}) == 2
    multivalue = build_prompt("multivalue", plain_tokenizer, 1500, 0)
    assert len(multivalue.answers) == 4 and len(set(multivalue.answers)) == 4
    assert all(len(v) == 7 for v in multivalue.answers)
    passkey = build_prompt("passkey", plain_tokenizer, 1500, 0)
    assert len(passkey.answers[0]) == 5 and "The grass is green." in passkey.text


def test_multiquery_and_variable_tracking(plain_tokenizer):
    multiquery = build_prompt("multiquery", plain_tokenizer, 1500, 0)
    needles = [p for p in multiquery.text.split("\n\n") if p.startswith("The special magic number for") and " is: " in p]
    assert len(needles) == 4 and len(multiquery.answers) == 2 and multiquery.match == "all"
    assert all(any(n.endswith(f" {a}.") for n in needles) for a in multiquery.answers)
    assert score(multiquery, " " + " and ".join(reversed(multiquery.answers))) == 1.0
    assert score(multiquery, " " + multiquery.answers[0]) == 0.0
    track = build_prompt("vartrack", plain_tokenizer, 1500, 0)
    first, *rest = track.answers
    chain = [f"VAR {first} = {numbers_in(track.text.split(f'VAR {first} = ')[1])[0]}."]
    chain += [f"VAR {name} = VAR {source}." for source, name in zip(track.answers, rest)]
    positions = [track.text.index(line) for line in chain]
    assert len(track.answers) == 3 and positions == sorted(positions)  # the chain reads in order
    assert score(track, " " + ", ".join(track.answers) + ".") == 1.0 and score(track, f" {first} and {rest[0]}") == 0.0
    assert score(track, " " + " ".join(a.lower() for a in track.answers)) == 0.0


def test_prompt_too_short_for_its_fixed_parts(plain_tokenizer):
    with pytest.raises(PatchattnError, match="too short"):
        build_prompt("multivalue", plain_tokenizer, 40, 0)


def test_scoring():
    one = Prompt("single", [1], "", ("1234567",), "any", 10, (0.5,))
    assert score(one, " 1234567.") == 1.0 and score(one, " 1,234,567") == 1.0 and score(one, " 123456") == 0.0
    first = Prompt("multikey", [1], "", ("1234567",), "first", 10, (0.5,))
    assert score(first, " 1234567, not 7654321") == 1.0 and score(first, " 7654321 or 1234567") == 0.0
    every = Prompt("multivalue", [1], "", ("1111111", "2222222"), "all", 10, (0.2, 0.8))
    assert score(every, "2222222 and 1111111") == 1.0 and score(every, "1111111") == 0.0
    assert numbers_in("a 12,345 b 7") == ["12345", "7"]


# ---- perplexity -----------------------------------------------------------------------------------
def test_perplexity_equals_naive(tiny_model, plain_tokenizer):
    ids = ppl_input_ids(plain_tokenizer, 200, seed=1)
    assert len(ids) == 200 and ids[0] == plain_tokenizer.bos_token_id
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = tiny_model(x).logits[0, :-1].double()
    naive_nll = -torch.log_softmax(logits, -1).gather(1, x[0, 1:, None]).squeeze(1)
    chunked = token_nll(tiny_model, x, chunk_tokens=7)
    torch.testing.assert_close(chunked.double(), naive_nll, rtol=1e-4, atol=1e-5)
    ppl = perplexity(tiny_model, ids)
    assert math.isfinite(ppl)
    assert ppl == pytest.approx(math.exp(naive_nll.mean().item()), rel=1e-5)
    assert ppl_input_ids(plain_tokenizer, 200, seed=1) == ids != ppl_input_ids(plain_tokenizer, 200, seed=2)


def test_chunked_nll_holds_where_a_long_pass_differs_from_a_short_one(tiny_model, caplog):
    """On a GPU in bfloat16 the first rows of a long patched prefill differ from a short forward's by more than the
    head check's tolerance; the check must compare the head on one forward, so a 32K prompt on a 262K vocabulary
    keeps chunked logits instead of materialising all of them (34 GB at Gemma 3's size)."""
    norm = tiny_model.base_model.norm

    def long_pass_differs(module, args, output):
        return output + 3.0 if output.shape[1] > 16 else output

    x = torch.randint(0, tiny_model.config.vocab_size, (1, 96))
    handle = norm.register_forward_hook(long_pass_differs)
    try:
        with torch.no_grad():
            own = tiny_model(x).logits[0, :-1].double()
        with caplog.at_level("WARNING", logger="patchattn"):
            chunked = token_nll(tiny_model, x, chunk_tokens=16)
    finally:
        handle.remove()
    assert "full logits" not in caplog.text
    expected = torch.nn.functional.cross_entropy(own, x[0, 1:], reduction="none")
    torch.testing.assert_close(chunked.double(), expected, rtol=1e-4, atol=1e-5)


# ---- runner ---------------------------------------------------------------------------------------
def test_context_limits(tiny_model):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=512, vocab_size=64))
    with pytest.raises(InputTooLongError, match="512"):
        check_lengths(gpt2, [1024])
    check_lengths(tiny_model, [4096])
    with pytest.raises(InputTooLongError, match="4096"):
        check_lengths(tiny_model, [1024, 8192])
    with pytest.raises(InputTooLongError):
        run_eval(tiny_model, None, {"dense": None}, [8192])  # refused before any prompt is built


@pytest.fixture(scope="module")
def tiny_results(tiny_model, plain_tokenizer):
    recipe = Recipe.uniform(tiny_model.config, "streaming", block_size=16, name="stream", sink_tokens=16, window_tokens=64)
    variants = {"dense": None, "streaming": recipe}
    steps = []
    results = run_eval(
        tiny_model, plain_tokenizer, variants, [512, 256], tasks=TASKS, trials=2, seed=0, progress=lambda n, d: steps.append((n, d))
    )
    return results, steps, eval_steps(variants, [512, 256], TASKS, 2)


def test_run_eval_end_to_end(tiny_results, tiny_model):
    results, steps, total = tiny_results
    assert results["schema_version"] == 2 and results["lengths"] == [256, 512] and results["speed_runs"] == 3
    assert list(results["variants"]) == ["dense", "streaming"]
    assert sum(n for n, _ in steps) == total == len(results["lengths"]) * 2 * (2 + (len(TASKS) - 2) * 2)  # ppl, speed: 1 step
    assert results["complete"] is True
    assert len(results["results"]) == 2 * len(TASKS) * 2
    by_key = {(r["length"], r["task"], r["variant"]): r for r in results["results"]}
    for (length, task, variant), row in by_key.items():
        other = by_key[(length, task, "streaming" if variant == "dense" else "dense")]
        assert row["prompt_tokens"] == other["prompt_tokens"]  # the same prompts for every variant
        assert all(length - haystack.LENGTH_SLACK_TOKENS <= n <= length for n in row["prompt_tokens"])
        if task == "ppl":
            assert row["metric"] == "perplexity" and math.isfinite(row["value"])
        elif task == "speed":  # time to first token and per generated token, on this CPU
            assert row["metric"] == "ttft_ms" and row["value"] > 0 and row["ms_per_token"] >= 0
            assert row["value"] == sorted(row["scores"])[1] and len(row["ms_per_token_runs"]) == 3  # medians of 3 runs
            assert results["ttft_interleaved"] is True  # the times to first token come from interleaved rounds
            assert row["device"] == "cpu" and (row["peak_memory"] is None) == (row["peak_bytes"] is None)
        else:
            assert row["metric"] == "accuracy" and 0.0 <= row["value"] <= 1.0 and len(row["replies"]) == 2
        if variant == "dense":
            assert row["sparsity"] == 0.0 and row["prefill_kernels"] is None
        elif task == "speed":  # no sparse kernel runs on a CPU: the speed runs prefill densely, as a user's "auto" does
            assert row["sparsity"] == 0.0 and set(row["prefill_kernels"]) == {"sdpa"}
        else:  # the quality tasks run the recipe's layouts whatever the device
            assert 0.0 < row["sparsity"] < 1.0  # a 64-token window skips blocks at 256+ tokens
            # on a CPU every patched layer's prefill ran the PyTorch reference; a prompt's prefill calls each layer once
            assert set(row["prefill_kernels"]) == {"torch"} and row["prefill_kernels"]["torch"] % tiny_model.config.num_hidden_layers == 0
        if task == "ppl":
            assert row["kv_bytes"] is None
        elif variant == "streaming":  # streaming KV heads keep sink + window only: the budgeted cache holds less
            assert 0 < row["kv_bytes"] < other["kv_bytes"] and row["kv_cache"] == "budgeted"
        if variant == "dense" or task == "ppl":
            assert row["kv_cache"] is None
    # the patched model was restored after the eval
    assert tiny_model.config._attn_implementation == "sdpa"
    json.dumps(results)


# ---- the user's own texts (--ppl-text) -----------------------------------------------------------
@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Two files of prose the model was not calibrated on, sharing a stem: one long, one of about 400 tokens."""
    root = tmp_path_factory.mktemp("texts")
    prose = load_text("calibration")
    long, short = root / "notes.txt", root / "more" / "notes.txt"
    short.parent.mkdir()
    long.write_text(prose[:8000].replace(". ", ".\n"), encoding="utf-8")
    short.write_text(prose[20_000:21_300], encoding="utf-8")
    return long, short


def test_ppl_text_options_refuse_unreadable_files(tmp_path):
    from patchattn.errors import OptionError
    from patchattn.eval.options import EvalOptions

    (tmp_path / "blank.txt").write_text(" \n\n")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine")
    for name, problem in (("missing.txt", "cannot read .*missing.txt: No such file"), ("blank.txt", "blank.txt is empty"),
                          ("latin1.txt", "cannot read .*latin1.txt: not UTF-8 text"), ("", "cannot read .*: Is a directory")):
        with pytest.raises(OptionError, match=problem) as refused:
            EvalOptions((256,), ppl_texts=(tmp_path / "ok.txt", tmp_path / name))
        assert refused.value.option == "ppl_texts"
    assert EvalOptions((256,), ppl_texts=[tmp_path / "ok.txt"]).ppl_texts == (str(tmp_path / "ok.txt"),)


def test_ppl_text_shorter_than_every_length_is_refused_before_a_variant_runs(tiny_model, plain_tokenizer, tmp_path):
    from patchattn.errors import OptionError

    (tmp_path / "tiny.txt").write_text("Too short to measure. " * 5)
    steps = []
    with pytest.raises(OptionError, match=r"tiny.txt is \d+ tokens under this tokenizer, shorter than the shortest eval length \(256"):
        run_eval(tiny_model, plain_tokenizer, {"dense": None}, [512, 256], tasks=("ppl",), progress=lambda n, d: steps.append(d),
                 ppl_texts=[tmp_path / "tiny.txt"])
    assert steps == []


def test_ppl_texts_rows_tables_and_progress(tiny_model, plain_tokenizer, text_files):
    from patchattn.eval.html import render_html
    from patchattn.eval.ppl_texts import load_ppl_texts
    from patchattn.eval.tables import all_tables, other_table, ppl_text_table

    long, short = text_files
    recipe = Recipe.uniform(tiny_model.config, "streaming", block_size=16, sink_tokens=16, window_tokens=64, name="stream")
    variants = {"dense": None, "streaming": recipe}
    texts = load_ppl_texts(plain_tokenizer, [long, short], [256, 512])
    assert [t.name for t in texts] == ["notes", "notes-2"] and [t.fits(512) for t in texts] == [True, False]
    steps = []
    results = run_eval(tiny_model, plain_tokenizer, variants, [256, 512], tasks=("ppl",), ppl_windows=2, seed=3,
                       progress=lambda n, d: steps.append(n), ppl_texts=[long, short])
    assert sum(steps) == eval_steps(variants, [256, 512], ("ppl",), ppl_windows=2, ppl_texts=texts) == 2 * (2 + 2 + 2 + 2 + 2)
    assert results["ppl_texts"] == [
        {"name": "notes", "path": str(long), "tokens": len(texts[0].ids), "skipped_lengths": []},
        {"name": "notes-2", "path": str(short), "tokens": len(texts[1].ids), "skipped_lengths": [512]},
    ]
    rows = {(r["length"], r["task"], r["variant"]): r for r in results["results"]}
    expected = {(n, task, v) for v in variants for n, task in
                [(256, "ppl"), (256, "ppl:notes"), (256, "ppl:notes-2"), (512, "ppl"), (512, "ppl:notes")]}
    assert set(rows) == expected and results["complete"] is True
    full_ids = {t.name: t.ids for t in texts}
    for (length, task, variant), row in rows.items():
        assert row["metric"] == "perplexity" and math.isfinite(row["value"]) and row["prompt_tokens"] == [length, length]
        if task == "ppl":
            assert "text" not in row
            continue
        text = texts[0] if task == "ppl:notes" else texts[1]
        assert row["text"] == text.path
        windows = text.windows(length, 2, seed=3)
        for window in windows:  # the tokenizer's BOS, then a stretch of the file as it tokenises whole
            body = window[1:]
            assert window[0] == plain_tokenizer.bos_token_id and len(window) == length
            assert any(full_ids[text.name][s : s + len(body)] == body for s in text.starts)
        if variant == "dense":
            assert row["sparsity"] == 0.0
            assert row["scores"] == pytest.approx([perplexity(tiny_model, w) for w in windows], rel=1e-5)
            assert row["value"] == pytest.approx(math.exp(sum(map(math.log, row["scores"])) / 2), rel=1e-9)
        else:
            assert 0.0 < row["sparsity"] < 1.0
    table = ppl_text_table(results)
    assert table in all_tables(results) and other_table(results) is None  # text rows are not lm-eval's
    assert table.columns == ["text", "length", "dense", "streaming", "streaming sparsity"]
    assert [r[:2] for r in table.rows] == [["held-out prose", "256"], ["held-out prose", "512"], ["notes", "256"],
                                           ["notes", "512"], ["notes-2", "256"], ["notes-2", "512"]]
    assert table.rows[2][3].endswith("%)") and table.rows[2][4].endswith("%") and table.rows[5][2:] == ["–", "–", "–"]
    assert "notes-2 at 512 tokens" in table.note and str(short) in table.note
    assert "## Perplexity per text" in render_markdown(results) and "<h3>Perplexity per text</h3>" in render_html(results, {})
    json.dumps(results)


# ---- report ---------------------------------------------------------------------------------------
def test_write_report(tiny_results, tmp_path):
    results = tiny_results[0]
    out = tmp_path / "new" / "report"
    paths = write_report(results, out)
    assert "KV cache at end of generation" in paths["md"].read_text()
    # the kernels of the timed runs: dense SDPA, no sparse kernel runs on a CPU (the quality tasks ran the reference)
    assert "| prefill kernels |" in paths["md"].read_text() and "| sdpa 100% |" in paths["md"].read_text()
    assert "in the timed runs" in paths["md"].read_text()
    assert "time to first token (ms)" in paths["md"].read_text() and "Speed and memory — CPU figures" in paths["md"].read_text()
    files = ["accuracy_vs_sparsity.png", "report.html", "results.json", "results.md", "results.png", "speed_vs_length.png"]
    assert set(paths) == {"json", "md", "png", "accuracy_png", "speed_png", "html"}
    assert sorted(p.name for p in out.iterdir()) == files  # no temp files
    assert json.loads(paths["json"].read_text()) == results
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "## 256 tokens" in md and "## 512 tokens" in md and "| task | dense | streaming |" in md
    assert md.count("*sparsity*") == 2 and "(−" in md or "(+" in md
    write_report(results, out)  # overwriting works and still leaves no temp files
    assert sorted(p.name for p in out.iterdir()) == files


def test_markdown_without_dense_baseline(tiny_results):
    results = dict(tiny_results[0])
    results["variants"] = {"streaming": results["variants"]["streaming"]}
    results["results"] = [r for r in results["results"] if r["variant"] == "streaming"]
    md = render_markdown(results)
    assert "| task | streaming |" in md and "(+" not in md and "(−" not in md


def test_unwritable_out_dir(tmp_path, tiny_results):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="cannot write"):
        ensure_writable_dir(blocker / "sub")
    with pytest.raises(OutputPathError):
        write_report(tiny_results[0], blocker)
    assert ensure_writable_dir(tmp_path / "x" / "y").is_dir()


# ---- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_dense_finds_passkey_and_needle(smollm):
    """Measured on CPU (seeds 0-2 at 2K): passkey 3/3, single needle 3/3."""
    model, tokenizer = smollm
    results = run_eval(model, tokenizer, {"dense": None}, [2048], tasks=("passkey", "single"), trials=3, seed=0)
    by_task = {r["task"]: r for r in results["results"]}
    assert all(2048 - haystack.LENGTH_SLACK_TOKENS <= n <= 2048 for r in by_task.values() for n in r["prompt_tokens"])
    assert by_task["passkey"]["value"] == 1.0, by_task["passkey"]["replies"]
    assert by_task["single"]["value"] >= 2 / 3, by_task["single"]["replies"]


def test_sparsity_record_pauses():
    from patchattn import stats

    with stats.record_sparsity() as rec:
        stats.report(0, 1.0, 4.0)
        with rec.paused():
            assert not stats.is_recording()
            stats.report(0, 3.0, 4.0)
        stats.report(1, 1.0, 4.0)
    assert rec.calls == 2 and rec.density == pytest.approx(2.0 / 8.0)


def test_times_to_first_token_come_from_rounds_that_run_each_variant_in_turn(tiny_model):
    """Each round enters every variant's patch in turn and times one generate of one token, so a drifting machine
    moves every variant alike; the patch is left after each run."""
    import contextlib

    from patchattn.eval.interleaved import interleaved_ttft
    from patchattn.eval.tasks import speed_generate_kwargs
    from patchattn.patch import patched

    recipe = Recipe.uniform(tiny_model.config, "streaming", block_size=16, sink_tokens=16, window_tokens=64)
    entered, generated = [], []
    original = tiny_model.generate

    def counting_generate(*args, **kwargs):
        generated.append((entered[-1], kwargs["max_new_tokens"], tiny_model.config._attn_implementation))
        return original(*args, **kwargs)

    @contextlib.contextmanager
    def variant(name, r):
        entered.append(name)
        with patched(tiny_model, r):
            yield

    tiny_model.generate = counting_generate
    try:
        times = interleaved_ttft(tiny_model, {"dense": lambda: variant("dense", None), "stream": lambda: variant("stream", recipe)},
                                 list(range(1, 200)), 3, speed_generate_kwargs(tiny_model))
    finally:
        del tiny_model.generate
    assert entered == ["dense", "stream"] * 3
    # an untimed run first in each patch of the first round (on a GPU, of every round: CUDA graphs are captured anew)
    assert [g[0] for g in generated] == ["dense", "dense", "stream", "stream"] + ["dense", "stream"] * 2
    assert {g[1] for g in generated} == {1}
    assert {g[2] for g in generated if g[0] == "stream"} == {"patchattn"} and "patchattn" not in {g[2] for g in generated if g[0] == "dense"}
    assert set(times) == {"dense", "stream"} and all(len(v) == 3 and min(v) > 0 for v in times.values())
    assert tiny_model.config._attn_implementation != "patchattn"
    with pytest.raises(ValueError, match="rounds"):
        interleaved_ttft(tiny_model, {}, [1, 2], 0, {})
