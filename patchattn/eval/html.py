"""``report.html``: one self-contained page (inline CSS, plots as base64 data URIs, no scripts, no fonts or
anything else fetched) that opens in any browser offline.

Every piece of text from the results goes through ``html.escape``; the tables are tables.py's cells.
"""

from __future__ import annotations

import base64
import html

from .tables import ReportTable, accuracy_tables, derived_label, describe_variant, device_label, other_table, ppl_text_table, speed_table, summary_table

PLOT_CAPTIONS = {
    "results.png": "Score of each task against context length, one line per variant.",
    "accuracy_vs_sparsity.png": "Score of each task against the prefill sparsity each variant reached (dense at 0), one line per length.",
    "speed_vs_length.png": "Time to first token, ms per generated token and KV cache against length, one line per variant.",
}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1150px; padding: 0 1rem; color: #1b1b1b; background: #fff; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .3rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
dl.info { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; }
dl.info dt { font-weight: 600; } dl.info dd { margin: 0; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .6rem; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; } th { background: #f2f2f2; }
td.derived { font-style: italic; color: #555; }
p.note { color: #555; font-size: .88rem; margin-top: 0; }
.partial { background: #fff3cd; border: 1px solid #e0c36a; padding: .5rem .8rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { color: #555; font-size: .88rem; }
code { background: #f4f4f4; padding: 0 .25rem; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_table(table: ReportTable) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        label = derived_label(row[0])
        first = f'<td class="derived">{_e(label)}</td>' if label is not None else f"<td>{_e(row[0])}</td>"
        cells = [first] + [f"<td>{_e(c)}</td>" for c in row[1:]]
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="note">{_e(table.note)}</p>' if table.note else ""
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>\n" + note


def _run_info(results: dict) -> str:
    env = results.get("environment") or {}
    items = [
        ("model", results.get("model")),
        ("device", f"{env.get('device', '?')} — {device_label(results)}"),
        ("created", results.get("created")),
        ("software", f"torch {env['torch']}, transformers {env['transformers']}, {env.get('dtype')}" if env.get("torch") else None),
        ("lengths (tokens)", ", ".join(str(n) for n in results.get("lengths", []))),
        ("tasks", ", ".join(results.get("tasks", []))),
        ("trials per task", results.get("trials")),
        ("perplexity windows", results.get("ppl_windows")),
        ("perplexity texts", ", ".join(f"{t['name']} ({t['path']})" for t in results.get("ppl_texts") or [])),
        ("timed runs per speed figure", results.get("speed_runs")),
        ("seed", results.get("seed")),
        ("schema", results.get("schema_version")),
    ]
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items if v not in (None, ""))
    return f'<dl class="info">{rows}</dl>\n'


def render_html(results: dict, images: dict[str, bytes]) -> str:
    """The page for ``results``; ``images`` maps a plot's file name to its PNG bytes (embedded, in that order)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>patchattn eval: {_e(results.get('model'))}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>patchattn eval: {_e(results.get('model'))}</h1>",
        _run_info(results),
    ]
    if results.get("complete") is False:
        parts.append(f'<p class="partial"><strong>Partial results</strong>: the run was interrupted after '
                     f"{len(results['results'])} result rows; missing cells were not measured.</p>")
    parts.append("<h2>Variants</h2>\n<ul>" + "".join(
        f"<li><code>{_e(name)}</code>: {_e(describe_variant(info))}</li>" for name, info in results["variants"].items()
    ) + "</ul>")
    parts.append(render_table(summary_table(results)))
    if images:
        parts.append("<h2>Plots</h2>")
        for name, png in images.items():
            caption = PLOT_CAPTIONS.get(name, name)
            parts.append(f'<figure><img src="{data_uri(png)}" alt="{_e(caption)}">'
                         f"<figcaption>{_e(name)}: {_e(caption)}</figcaption></figure>")
    parts.append("<h2>Accuracy and perplexity</h2>")
    for table in (*accuracy_tables(results), ppl_text_table(results)):
        if table is not None:
            parts.append(f"<h3>{_e(table.title)}</h3>\n" + render_table(table))
    speed = speed_table(results)
    parts.append(f"<h2>{_e(speed.title)}</h2>\n" + render_table(speed) if speed else
                 '<h2>Speed and memory</h2>\n<p class="note">Not measured in this run.</p>')
    extra = other_table(results)
    parts.append("<h2>lm-eval tasks</h2>\n" + (render_table(extra) if extra else '<p class="note">No lm-eval tasks in this run.</p>'))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
