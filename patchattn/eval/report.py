"""Write an eval's results: ``results.json``, ``results.md``, the PNG plots and a self-contained ``report.html``.

Everything is rendered in memory first; each file is then written under a temporary name in the output
directory and renamed into place, so a reader never sees half a file. The tables come from tables.py, the
figures from plots.py, the page from html.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io import ensure_writable_dir, write_bytes_atomic
from .html import render_html
from .plots import FILES as PLOT_FILES
from .plots import RENDERERS, render_png
from .tables import BASELINE, ReportTable, accuracy_tables, describe_variant, other_table, ppl_text_table, speed_table, summary_table

FILES = {"json": "results.json", "md": "results.md", **PLOT_FILES, "html": "report.html"}

__all__ = ["FILES", "ensure_writable_dir", "render_markdown", "render_png", "write_report"]


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the report into ``out_dir`` (created if missing); returns {kind: path} for each file written
    (kinds as in ``FILES``; a plot with nothing to draw, e.g. speed without speed rows, is left out).
    An unwritable ``out_dir`` raises OutputPathError before anything is rendered."""
    out_dir = ensure_writable_dir(out_dir)
    images = {kind: png for kind, render in RENDERERS.items() if (png := render(results)) is not None}
    contents = {
        "json": (json.dumps(results, indent=2) + "\n").encode("utf-8"),
        "md": render_markdown(results, [FILES[kind] for kind in images]).encode("utf-8"),
        **images,
        "html": render_html(results, {FILES[kind]: png for kind, png in images.items()}).encode("utf-8"),
    }
    return {kind: write_bytes_atomic(out_dir / FILES[kind], data) for kind, data in contents.items()}


def markdown_table(table: ReportTable) -> list[str]:
    lines = ["| " + " | ".join(table.columns) + " |", "|---|" + "---:|" * (len(table.columns) - 1)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table.rows]
    return lines + ([] if not table.note else ["", table.note])


def _placement(env: dict) -> str:
    """Where the model ran: its device, or every device of a model placed over several."""
    devices = env.get("devices") or [env.get("device")]
    return env.get("device") if len(devices) <= 1 else " + ".join(devices) + " (layers placed by accelerate)"


def render_markdown(results: dict, plot_files: list[str] = ()) -> str:
    has_base = BASELINE in results["variants"]
    env = results.get("environment", {})
    lines = [
        "# patchattn eval",
        "",
        f"Model: {results['model']} · trials per task: {results['trials']} · seed: {results['seed']}"
        + (f" · perplexity over {results['ppl_windows']} windows" if results.get("ppl_windows", 1) > 1 else "")
        + (f" · torch {env['torch']}, transformers {env['transformers']} on {_placement(env)} ({env.get('dtype')})" if env else ""),
        "",
        "Accuracy is the fraction of trials answered correctly (higher is better); perplexity is on held-out "
        "State of the Union prose (lower is better" + (", and on each text given in Perplexity per text" if results.get("ppl_texts") else "")
        + "); sparsity is the share of causal query-key blocks the "
        "variant skipped in prefill attention (on layers with the model's own sliding window, of the blocks the window "
        "reaches)."
        + (f" Brackets: difference from `{BASELINE}` on the same prompts; for accuracy, how many prompts `{BASELINE}` "
           "answered that the variant missed (lost) and the reverse (won), and p, the chance of flips at least that one-sided "
           "if each flipped prompt had gone either way at even odds (McNemar's exact test): a difference of one-way "
           "flips with a small p is the variant's, one of as many won as lost is noise." if has_base else ""),
    ]
    if results.get("complete") is False:
        lines += ["", f"**Partial results**: the run was interrupted after {len(results['results'])} result rows; "
                  "missing cells were not measured."]
    lines += ["", "## Variants", ""]
    lines += [f"- `{name}`: {describe_variant(info)}" for name, info in results["variants"].items()]
    lines += ["", *markdown_table(summary_table(results))]
    for table in accuracy_tables(results):
        lines += ["", f"## {table.title}", "", *markdown_table(table)]
    for table in (ppl_text_table(results), speed_table(results), other_table(results)):
        if table is not None:
            lines += ["", f"## {table.title}", "", *markdown_table(table)]
    if plot_files:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plot_files]
        lines += ["", "All of it in one page: `report.html` (opens offline)."]
    return "\n".join(lines) + "\n"
