"""lm-eval's own command line, with patchattn's attention function registered first.

A directory written by ``patchattn export`` names ``attn_implementation="patchattn"`` in its config, which only a
process that imported patchattn can load. lm-eval's ``lm_eval`` command does not, so run it through this module,
with the same arguments, alone or under accelerate's data-parallel launcher (one model copy per GPU)::

    python -m patchattn.lm_eval_cli --model hf --model_args pretrained=patched/ --tasks patchattn --include_path TASKS/8192
    accelerate launch -m patchattn.lm_eval_cli --model hf --model_args pretrained=patched/ --tasks patchattn --include_path TASKS/8192

(``patchattn eval --lm-eval-tasks`` writes the patchattn task directories: ``lm_eval_tasks/<length>`` beside its results.)
"""

from __future__ import annotations

import sys

import patchattn  # noqa: F401  (registers the "patchattn" attention function)

from .eval.lmeval import LmEvalMissingError, require_lm_eval


def main() -> None:
    try:
        require_lm_eval()
    except LmEvalMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    main()
