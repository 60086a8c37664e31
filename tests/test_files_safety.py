"""Nothing of the user's is lost and nothing of patchattn's is left: --overwrite replaces only an earlier export, the
current directory is refused, SIGTERM leaves no temporary directory, two first GGUF conversions at once both succeed,
truncated weights are one clear error, and a failed command takes back the empty directories it made."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

import pytest
from conftest import byte_tokenizer, tiny_model
from typer.testing import CliRunner

import patchattn
from patchattn import cleanup, io, models
from patchattn.errors import ModelLoadError, OutputPathError
from patchattn.export import MANIFEST, check_output_dir, export
from patchattn.recipe import Recipe

TESTS = Path(__file__).resolve().parent


def _export(out_dir, overwrite=False, window_tokens=64, model=None):
    model = model or tiny_model("llama")
    recipe = Recipe.uniform(model.config, "streaming", sink_tokens=16, window_tokens=window_tokens)
    return export(model, byte_tokenizer(), recipe, out_dir, overwrite=overwrite)


def _hidden(directory: Path) -> list[str]:
    """The temporary siblings (.NAME.tmp-*, .NAME.old-*, a conversion's .NAME.*) left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def signal_handlers():
    """patchattn's handlers, as the CLI installs them; the test process's own put back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, *cleanup.TERMINATING_SIGNALS)}
    cleanup.install_signal_handlers()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def no_created_dirs_record():
    io.forget_created_dirs()
    yield
    io.forget_created_dirs()


# ---------------------------------------------------------------------------------------------- --overwrite
def test_overwrite_refuses_a_directory_that_is_not_an_export(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "config.json").write_text('{"model_type": "llama"}')  # a model folder, not a patchattn export
    with pytest.raises(OutputPathError, match="not an earlier patchattn export") as info:
        _export(target, overwrite=True)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "notes.txt"]
    assert (target / "notes.txt").read_text() == "mine"
    assert _hidden(tmp_path) == []


def test_overwrite_replaces_an_earlier_export(tmp_path):
    out = tmp_path / "exp"
    _export(out, window_tokens=64)
    first = json.loads((out / MANIFEST).read_text())["files"]
    assert {"config.json", "model.safetensors", "recipe.json", "README.md", MANIFEST} <= set(first)
    assert sorted(p.name for p in out.iterdir()) == first
    _export(out, overwrite=True, window_tokens=128)
    assert Recipe.load(out / "recipe.json").layers[0][0].params["window_tokens"] == 128
    assert _hidden(tmp_path) == []
    assert out.stat().st_mode & 0o777 == 0o777 & ~io.current_umask()  # not mkdtemp's 0700
    model, _ = patchattn.load(out, device="cpu")
    assert model.config._attn_implementation == "patchattn"


def test_overwrite_keeps_files_the_user_added_to_an_export(tmp_path):
    out = tmp_path / "exp"
    _export(out)
    (out / "results.json").write_text("{}")
    with pytest.raises(OutputPathError, match="results.json, which the export did not write"):
        _export(out, overwrite=True)
    assert (out / "results.json").read_text() == "{}"
    # an export made before the manifest: known file names only
    (out / MANIFEST).unlink()
    with pytest.raises(OutputPathError, match="results.json"):
        _export(out, overwrite=True)
    (out / "results.json").unlink()
    _export(out, overwrite=True)
    assert (out / MANIFEST).is_file() and _hidden(tmp_path) == []


def test_a_failed_second_rename_puts_the_earlier_export_back(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    _export(out, window_tokens=64)
    before = sorted(p.name for p in out.iterdir())
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".exp.tmp-"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputPathError, match="No space left"):
        _export(out, overwrite=True, window_tokens=128)
    assert sorted(p.name for p in out.iterdir()) == before
    assert Recipe.load(out / "recipe.json").layers[0][0].params["window_tokens"] == 64
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("where", [".", "cwd", "parent", "root"])
def test_the_current_directory_its_parents_and_the_root_are_refused(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = {".": Path("."), "cwd": work, "parent": tmp_path, "root": Path("/")}[where]
    with pytest.raises(OutputPathError, match="current directory|filesystem root"):
        check_output_dir(out, overwrite=True)
    with pytest.raises(OutputPathError, match="current directory|filesystem root"):
        _export(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["data.txt"]


def test_cli_export_into_the_current_directory_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    from patchattn.cli import app

    Recipe.uniform(tiny_model("llama").config, "dense").save(tmp_path / "r.json")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["export", str(tiny_model_dir), "-r", "r.json", "-o", ".", "--overwrite"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "current directory" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "new" / "exp"
    tokenizer = byte_tokenizer()

    def disk_full(self, path):
        raise OSError(28, "disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", disk_full)
    model = tiny_model("llama")
    with pytest.raises(OSError, match="disk full"):
        export(model, tokenizer, Recipe.uniform(model.config, "dense"), out)
    assert _hidden(tmp_path / "new") == [] and not out.exists()
    assert io.remove_created_dirs() == [tmp_path / "new"]  # the parent check_output_dir made
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- signals
def test_signals_are_held_back_inside_deferred_signals(signal_handlers, tmp_path):
    with pytest.raises(cleanup.Terminated) as info, cleanup.temporary_paths() as temp:
        made = temp.mkdtemp(dir=tmp_path, prefix=".x.tmp-")
        with cleanup.deferred_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            (made / "f").write_text("still running")  # not interrupted inside the block
        pytest.fail("SIGTERM was not raised when the block ended")
    assert info.value.exit_code == 128 + signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)
    assert list(tmp_path.iterdir()) == []


def test_handlers_leave_a_signal_someone_else_handles(signal_handlers):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        cleanup.install_signal_handlers()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


CHILD = """
import sys, types
sys.path.insert(0, {tests!r})
from conftest import byte_tokenizer, tiny_model
from patchattn.cleanup import Terminated, install_signal_handlers
from patchattn.export import export
from patchattn.recipe import Recipe

install_signal_handlers()
model = tiny_model("llama")
save = type(model).save_pretrained

def save_then_wait(self, *args, **kwargs):
    save(self, *args, **kwargs)
    print("saved", flush=True)
    sys.stdin.readline()  # the parent sends SIGTERM now
    print("not interrupted", flush=True)

model.save_pretrained = types.MethodType(save_then_wait, model)
try:
    export(model, byte_tokenizer(), Recipe.uniform(model.config, "streaming", sink_tokens=16, window_tokens=64), {out!r})
except Terminated as exc:
    print("terminated", flush=True)
    sys.exit(exc.exit_code)
"""


def test_sigterm_while_saving_an_export_leaves_no_temporary_directory(tmp_path):
    out = tmp_path / "exp"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(tests=str(TESTS), out=str(out))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(Path(patchattn.__file__).parents[1])},
    )
    try:
        assert child.stdout.readline().strip() == "saved", child.stderr.read()
        assert any(p.name.startswith(".exp.tmp-") for p in tmp_path.iterdir())  # mid-export: the temporary one exists
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert "terminated" in stdout and "not interrupted" not in stdout
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- GGUF conversion cache
class _FakeModel:
    def save_pretrained(self, path):
        (Path(path) / "config.json").write_text("{}")
        (Path(path) / "model.safetensors").write_bytes(b"weights")


class _FakeTokenizer:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHATTN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_two_conversions_at_once_convert_once_and_both_succeed(gguf_file, monkeypatch):
    started, waiting, release = threading.Event(), threading.Event(), threading.Event()
    conversions = []

    def dequantise(gguf):
        conversions.append(gguf)
        started.set()
        assert release.wait(60)
        return _FakeModel(), _FakeTokenizer()

    class Notice(logging.Handler):
        def emit(self, record):
            if "waiting for another patchattn process" in record.getMessage():
                waiting.set()

    monkeypatch.setattr(models, "_dequantise", dequantise)
    log = logging.getLogger("patchattn.models")
    notice = Notice()
    log.addHandler(notice)
    level = log.level
    log.setLevel(logging.INFO)
    results, errors = [], []

    def convert():
        try:
            results.append(models.convert_gguf(gguf_file))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    first, second = threading.Thread(target=convert), threading.Thread(target=convert)
    try:
        first.start()
        assert started.wait(60)
        second.start()
        assert waiting.wait(60), "the second conversion did not wait for the first"
        release.set()
        first.join(60)
        second.join(60)
    finally:
        release.set()
        log.removeHandler(notice)
        log.setLevel(level)
    target = models._gguf_cache_path(gguf_file)
    assert errors == [] and results == [target, target]
    assert len(conversions) == 1
    assert _hidden(target.parent) == [] and (target / "model.safetensors").is_file()


def test_a_conversion_finished_meanwhile_by_another_process_is_used(gguf_file, monkeypatch):
    """Without a lock (a filesystem that refuses flock): the other process's complete result wins over this one's."""
    target = models._gguf_cache_path(gguf_file)

    def dequantise(gguf):
        target.mkdir(parents=True)  # the other process renames its result into place now
        (target / "config.json").write_text('{"theirs": true}')
        (target / "model.safetensors").write_bytes(b"theirs")
        return _FakeModel(), _FakeTokenizer()

    monkeypatch.setattr(models, "_conversion_lock", lambda cache: nullcontext())
    monkeypatch.setattr(models, "_dequantise", dequantise)
    assert models.convert_gguf(gguf_file) == target
    assert json.loads((target / "config.json").read_text()) == {"theirs": True}
    assert _hidden(target.parent) == []


def test_an_incomplete_cache_entry_is_converted_again(gguf_file, monkeypatch):
    target = models._gguf_cache_path(gguf_file)
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_text("{}")  # no config.json, no weights: not a finished conversion
    monkeypatch.setattr(models, "_dequantise", lambda gguf: (_FakeModel(), _FakeTokenizer()))
    assert models.convert_gguf(gguf_file) == target and (target / "model.safetensors").is_file()
    assert _hidden(target.parent) == []


def test_sigterm_during_the_first_conversion_leaves_nothing_in_the_cache(gguf_file, monkeypatch, signal_handlers):
    class Killed(_FakeModel):
        def save_pretrained(self, path):
            (Path(path) / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            (Path(path) / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_dequantise", lambda gguf: (Killed(), _FakeTokenizer()))
    with pytest.raises(cleanup.Terminated):
        models.convert_gguf(gguf_file)
    assert list((Path(os.environ["PATCHATTN_CACHE"]) / "gguf").iterdir()) == []


# ---------------------------------------------------------------------------------------------- unreadable weights
def test_truncated_safetensors_in_an_export_is_one_line(tmp_path):
    out = tmp_path / "exp"
    _export(out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    for size in (0, 100, len(data) // 2):
        weights.write_bytes(data[:size])
        with pytest.raises(ModelLoadError) as info:
            patchattn.load(out, device="cpu")
        message = str(info.value)
        assert "\n" not in message and str(weights) in message and "export" in message, message


def test_truncated_safetensors_in_a_model_directory_is_one_line(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated or corrupt; replace the file") as info:
        models.load_model(str(tiny_model_dir), device="cpu")
    assert str(weights) in str(info.value)


# ---------------------------------------------------------------------------------------------- created directories
def test_created_dirs_are_removed_deepest_first_while_empty(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    io.ensure_writable_dir(existing)
    leaf = io.ensure_writable_dir(existing / "a" / "b" / "c")
    assert list(leaf.iterdir()) == []  # no probe file left
    assert list(existing.iterdir()) == [existing / "a"]
    (existing / "a" / "kept.txt").write_text("something was written")
    assert io.remove_created_dirs() == [existing / "a" / "b" / "c", existing / "a" / "b"]
    assert sorted(p.name for p in (existing / "a").iterdir()) == ["kept.txt"]
    assert existing.is_dir()  # made by the user, not by patchattn
    assert io.remove_created_dirs() == []  # the record is cleared


def test_forget_created_dirs_keeps_them(tmp_path):
    io.ensure_writable_dir(tmp_path / "out" / "sub")
    io.forget_created_dirs()
    assert io.remove_created_dirs() == []
    assert (tmp_path / "out" / "sub").is_dir()


def test_relative_created_dirs_are_removed_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = Path.cwd()
    io.ensure_writable_dir("rel/out")
    monkeypatch.chdir("/")
    assert io.remove_created_dirs() == [here / "rel" / "out", here / "rel"]
    assert list(tmp_path.iterdir()) == []
