"""The ``patchattn`` command: calibrate, eval, export. Parses, calls the library, renders with Rich.

``app`` (app.py) is the Typer app; importing this package registers every command on it: calibrate
(calibrate_command.py, its tables in calibrate_tables.py), export (export_command.py) and eval (eval_command.py, what
it compares in eval_recipes.py, its run and tables in eval_run.py)."""

from __future__ import annotations

from .app import DEBUG_OPTION, MODEL_HELP, _flag, _message, _progress, _run, _STATE, app, console, err_console, main

# The commands register in this order, the order `patchattn --help` lists them in.
from .calibrate_command import calibrate  # isort: skip
from .export_command import export  # isort: skip
from .eval_command import evaluate  # isort: skip

from .calibrate_tables import HIGH_OUTPUT_ERROR, _print_kinds, _print_recipe, _print_search, _worst_kind
from .eval_recipes import DEFAULT_EVAL_LENGTHS, _bundles_recipe, _parse_lengths, _verified_lengths
from .eval_run import _print_results

__all__ = ["app", "calibrate", "evaluate", "export", "run", "HIGH_OUTPUT_ERROR", "DEFAULT_EVAL_LENGTHS"]


def run() -> None:  # pragma: no cover - console-script shim
    app()
