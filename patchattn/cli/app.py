"""The Typer app every command registers on: the --debug / --verbose callback, the consoles, the one-line error
handling (``_run``) with the library's option names written as flags, and the progress bar."""

from __future__ import annotations

import logging
import re

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import OptionError, PatchattnError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-free sparse attention for long-context HuggingFace LMs.")
console = Console(stderr=False)
err_console = Console(stderr=True)
_STATE = {"debug": False}

MODEL_HELP = "HuggingFace id already in the local cache, a local model directory, or a .gguf file (default: the embedded SmolLM2-135M-Instruct)."
DEVICE_MAP_HELP = "Place the model with accelerate: auto, balanced, balanced_low_0 or sequential (over every visible GPU; default: auto on CUDA)."


def _set_debug(debug: bool) -> bool:
    """--debug, before or after the subcommand: tracebacks and debug logs."""
    if debug:
        _STATE["debug"] = True
        logging.getLogger().setLevel(logging.DEBUG)
        import transformers

        transformers.utils.logging.set_verbosity_warning()
        transformers.utils.logging.enable_progress_bar()
    return debug


DEBUG_OPTION = typer.Option(False, "--debug", help="Show tracebacks and debug logs.", callback=_set_debug)


@app.callback()
def main(
    debug: bool = DEBUG_OPTION,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs."),
):
    _STATE["debug"] = debug  # a --debug after the subcommand sets it again when that is parsed
    from ..cleanup import install_signal_handlers

    install_signal_handlers()  # SIGTERM unwinds like Ctrl-C: temporary files go, finished eval rows stay
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)])
    if not debug:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


# Options whose library name differs from the flag's spelling; the others are their flags with "_" for "-".
_FLAGS = {"n_rows": "--rows", "ppl_texts": "--ppl-text", "texts": "--text"}
_OPTION_NAMES = re.compile(r"\b(target_sparsity|max_loss|seq_len|block_size|n_rows|kv_budget|decode_pages|decode_recall|retrieval_weight|"
                           r"dense_prefix_tokens|min_sparse_tokens|ppl_windows|ppl_texts|speed_runs)\b")


def _flag(option: str) -> str:
    return _FLAGS.get(option, "--" + option.replace("_", "-"))


def _message(exc: PatchattnError) -> str:
    """The error's line, the library's option names written as the flags a CLI user typed."""
    text = f"{_flag(exc.option)} {exc.problem}" if isinstance(exc, OptionError) else str(exc)
    return _OPTION_NAMES.sub(lambda m: _flag(m.group(1)), text)


def _run(fn, *args, **kwargs):
    """Call ``fn``; turn errors into one readable line and a non-zero exit code (tracebacks with --debug). A command
    that fails takes back the empty directories it created."""
    from ..io import forget_created_dirs, remove_created_dirs

    try:
        result = fn(*args, **kwargs)
        forget_created_dirs()
        return result
    except BaseException as exc:
        remove_created_dirs()
        if _STATE["debug"] or isinstance(exc, (typer.Exit, SystemExit)):
            raise
        if isinstance(exc, PatchattnError):
            err_console.print(f"[bold red]error:[/] {_message(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM / SIGHUP (patchattn.cleanup.Terminated)
            err_console.print(f"[bold red]{exc or 'interrupted'}[/]", highlight=False)
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None
        if not isinstance(exc, Exception):
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(
            f"[bold red]error:[/] unexpected {type(exc).__name__}: {message} (run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


def _comma_list(text: str) -> tuple[str, ...]:
    """A comma-separated option's items, blanks dropped."""
    return tuple(s.strip() for s in text.split(",") if s.strip())
