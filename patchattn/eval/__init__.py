"""Dense vs patched on the same prompts: perplexity, passkey and RULER-style needles, achieved sparsity.

``run_eval`` (runner.py) produces a versioned, JSON-serialisable results dict; ``write_report``
(report.py) turns it into results.json / results.md / PNG plots (plots.py) / a self-contained report.html
(html.py), all from the same tables (tables.py; their cells are formatted in cells.py, the results dict is read
through results.py). Prompt builders live in haystack.py, the tasks themselves (speed included) in tasks.py.
"""

from .haystack import Prompt, build_prompt
from .report import ensure_writable_dir, write_report
from .runner import DEFAULT_TASKS, TASKS, check_lengths, eval_steps, run_eval

__all__ = ["DEFAULT_TASKS", "TASKS", "Prompt", "build_prompt", "check_lengths", "ensure_writable_dir", "eval_steps", "run_eval", "write_report"]
