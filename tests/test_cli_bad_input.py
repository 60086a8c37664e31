"""Bad options, table by table: each is refused before the model loads, with one readable line naming the flag, exit
code 2, no traceback, and nothing left behind in the working directory (not even an empty output directory)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from patchattn.cli import app

runner = CliRunner()


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with a text, a recipe stand-in, a file and a directory, and a model loader that must not run."""
    import patchattn.models

    (tmp_path / "text.txt").write_text("Some prose. " * 200)
    (tmp_path / "recipe.json").write_text(json.dumps({"not": "used"}))
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_dir" / "mine.txt").write_text("keep me too")
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(patchattn.models, "load_model", no_load)
    monkeypatch.chdir(tmp_path)
    return tmp_path


CALIBRATE = [
    (["--seq-len", "-5"], "--seq-len must be an integer >= 256"),
    (["--seq-len", "0"], "--seq-len must be an integer >= 256"),
    (["--seq-len", "50", "--block-size", "16"], "--seq-len must be an integer >= 64"),
    (["--block-size", "48"], "--block-size must be one of 16, 32, 64, 128, 256"),
    (["--target-sparsity", "1.5"], "--target-sparsity must be a finite number in [0, 1)"),
    (["--target-sparsity", "1"], "--target-sparsity must be a finite number in [0, 1)"),
    (["--target-sparsity", "-0.1"], "--target-sparsity must be a finite number in [0, 1)"),
    (["--target-sparsity", "nan"], "--target-sparsity must be a finite number"),
    (["--kv-budget", "0"], "--kv-budget must be a finite number in (0, 1]"),
    (["--kv-budget", "2"], "--kv-budget must be a finite number in (0, 1]"),
    (["--decode-pages", "4"], "--kv-budget"),
    (["--kv-budget", "0.3", "--decode-recall", "1.5"], "--decode-recall must be a finite number in (0, 1]"),
    (["--decode-pages", "-1"], "--decode-pages must be an integer >= 0"),
    (["--retrieval-weight", "2"], "--retrieval-weight must be a finite number in [0, 1]"),
    (["--dense-prefix-tokens", "-1"], "--dense-prefix-tokens must be an integer between 0 and 4095"),
    (["--dense-prefix-tokens", "4096"], "--dense-prefix-tokens must be an integer between 0 and 4095"),
    (["--probes", "-1"], "--probes must be an integer >= 0"),
    (["--needles", "-1"], "--needles must be an integer >= 0"),
    (["--min-sparse-tokens", "-1"], "--min-sparse-tokens must be an integer >= 0"),
    (["--rows", "0"], "--rows must be an integer >= 1"),
    (["--strategies", "dense,bogus"], "--strategies names unknown bogus"),
    (["--strategies", ","], "--strategies needs at least one"),
    (["--objective", "bogus"], "--objective must be one of mass, output, residual"),
    (["--text", "missing.txt"], "--text cannot read missing.txt: No such file or directory"),
    (["--text", "blank.txt"], "--text blank.txt is empty"),
    (["--text", "latin1.txt"], "--text cannot read latin1.txt: not UTF-8 text"),
    (["--text", "a_dir"], "--text cannot read a_dir: Is a directory"),
    (["--kinds", "prose,bogus"], "--kinds names unknown bogus; choose from prose, code, docs, dialogue, structured"),
    (["--kinds", ","], "--kinds needs at least one of prose, code"),
    (["--kinds", "code,code"], "--kinds names code twice"),
    (["--robust", "best"], "--robust must be one of worst, mean"),
    (["--verify", "unseen"], "--verify must be one of auto, held-out, unseen-kind"),
    (["--verify", "unseen-kind", "--target-sparsity", "0.5"], "--verify unseen-kind measures the loss bound"),
    (["--verify", "unseen-kind"], "--verify unseen-kind measures each kind of text under a recipe allocated on the others"),
    (["-o", "a_dir"], "--output a_dir is a directory"),
    (["-o", "a_file/r.json"], "cannot write"),
    (["-o", "new/r.json", "--heatmap", "new/r.json"], "must be different files"),
    (["--heatmap", "a_dir"], "--heatmap a_dir is a directory"),
    (["--baseline-output", "a_dir"], "--baseline-output a_dir is a directory"),
]

EVAL = [
    ([], "nothing to compare: pass --recipe"),
    (["-r", "recipe.json", "--trials", "0"], "--trials must be an integer >= 1"),
    (["--tasks", "ppl,bogus"], "--tasks names unknown bogus"),
    (["--tasks", ","], "--tasks needs at least one"),
    (["--lengths", "abc"], "--lengths must be comma-separated integers"),
    (["--lengths", "64"], "--lengths must be an integer >= 128"),
    (["--lengths", ","], "--lengths needs at least one length"),
    (["--speed-runs", "-1"], "--speed-runs must be an integer >= 0"),
    (["--ppl-windows", "0"], "--ppl-windows must be an integer >= 1"),
    (["--ppl-text", "text.txt", "--ppl-text", "missing.txt"], "--ppl-text cannot read missing.txt: No such file or directory"),
    (["--ppl-text", "blank.txt"], "--ppl-text blank.txt is empty"),
    (["--ppl-text", "latin1.txt"], "--ppl-text cannot read latin1.txt: not UTF-8 text"),
    (["--ppl-text", "a_dir"], "--ppl-text cannot read a_dir: Is a directory"),
    (["--backend", "cuda"], "--backend must be one of auto, sparse, torch, triton"),
    (["--baseline", "median"], "--baseline must be one of uniform"),
    (["-o", "a_file"], "--output a_file exists and is not a directory"),
    (["-r", "missing.json"], "recipe missing.json does not exist"),
    (["-r", "recipe.json"], "schema version"),
    (["--lm-eval-args", "limit"], "--lm-eval-args"),
]

EXPORT = [
    (["-r", "missing.json", "-o", "out"], "recipe missing.json does not exist"),
    (["-r", "recipe.json", "-o", "out"], "schema version"),
]


def check_refused(work, args, fragment):
    before = tree(work)
    result = runner.invoke(app, args, catch_exceptions=False)
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert fragment in errors[0], errors[0]
    assert tree(work) == before, "a refused command left something behind"
    assert (work / "a_file").read_text() == "keep me" and (work / "a_dir" / "mine.txt").read_text() == "keep me too"


@pytest.mark.parametrize("args,fragment", CALIBRATE, ids=[" ".join(a) for a, _ in CALIBRATE])
def test_calibrate_refuses_before_loading(work, args, fragment):
    check_refused(work, ["calibrate", "--text", "text.txt", "-o", "new/r.json", *args], fragment)


@pytest.mark.parametrize("args,fragment", EVAL, ids=[" ".join(a) for a, _ in EVAL])
def test_eval_refuses_before_loading(work, args, fragment):
    check_refused(work, ["eval", "-o", "results", *args], fragment)  # options are checked before the recipes are read


@pytest.mark.parametrize("args,fragment", EXPORT, ids=[" ".join(a) for a, _ in EXPORT])
def test_export_refuses_before_loading(work, args, fragment):
    check_refused(work, ["export", *args], fragment)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_taken_before_or_after_the_subcommand(work, where):
    args = ["calibrate", "--block-size", "48"]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert "block_size must be one of" in str(result.exception)  # --debug raises: the traceback is the user's to see


def test_ctrl_c_while_the_libraries_import_ends_with_one_line(monkeypatch, capsys):
    """The console script (patchattn_entry) catches a Ctrl-C during ``import patchattn.cli`` (torch and transformers
    take seconds to import): one line, exit code 130, no traceback."""
    import builtins
    import sys

    import patchattn_entry

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "patchattn.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "patchattn.cli", raising=False)
    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as exited:
        patchattn_entry.main()
    assert exited.value.code == 130 and capsys.readouterr().err == "interrupted\n"
