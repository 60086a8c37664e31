"""Write an eval's results as ``results.json``, ``results.md`` and ``results.png``.

Everything is rendered in memory first; each file is then written under a temporary name in the output
directory and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from ..io import ensure_writable_dir, write_bytes_atomic

BASELINE = "dense"
FILES = {"json": "results.json", "md": "results.md", "png": "results.png"}
TASK_TITLES = {
    "ppl": "perplexity",
    "passkey": "passkey (filler)",
    "single": "single needle",
    "multikey": "multi-key needle",
    "multivalue": "multi-value needle",
    "speed": "time to first token (ms)",
}

__all__ = ["ensure_writable_dir", "render_markdown", "render_png", "write_report"]


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the three files into ``out_dir`` (created if missing); returns {"json"|"md"|"png": path}.
    An unwritable ``out_dir`` raises OutputPathError before anything is rendered."""
    out_dir = ensure_writable_dir(out_dir)
    contents = {
        "json": (json.dumps(results, indent=2) + "\n").encode("utf-8"),
        "md": render_markdown(results).encode("utf-8"),
        "png": render_png(results),
    }
    return {kind: write_bytes_atomic(out_dir / FILES[kind], data) for kind, data in contents.items()}


# ---- markdown -------------------------------------------------------------------------------------
def _rows(results: dict) -> dict[tuple[int, str, str], dict]:
    return {(r["length"], r["task"], r["variant"]): r for r in results["results"]}


def _fmt_value(row: dict | None) -> str:
    if row is None:
        return "–"
    return f"{row['value']:.2f}"


def _fmt_delta(row: dict | None, base: dict | None) -> str:
    if row is None or base is None:
        return ""
    if row.get("metric") == "ttft_ms":
        return f" ({base['value'] / row['value']:.2f}x)" if row["value"] else ""
    delta = row["value"] - base["value"]
    text = f"{'+' if delta >= 0 else '−'}{abs(delta):.2f}"
    if row.get("metric") == "perplexity" and base["value"]:
        text += f", {100 * delta / base['value']:+.1f}%"
    return f" ({text})"


def _fmt_sparsity(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _mean_sparsity(rows: list[dict]) -> float | None:
    values = [r["sparsity"] for r in rows if r.get("sparsity") is not None]
    return sum(values) / len(values) if values else None


def _mean_kv(rows: list[dict]) -> float | None:
    values = [r["kv_bytes"] for r in rows if r.get("kv_bytes") is not None]
    return sum(values) / len(values) if values else None


def _fmt_kv(value: float | None, base: float | None) -> str:
    if value is None:
        return "–"
    text = f"{value / 2**20:.1f} MiB"
    if base and value != base:
        text += f" ({100 * (value - base) / base:+.0f}%)"
    return text


def _speed_lines(speed_rows: list[dict | None], base: dict | None) -> list[str]:
    """Extra table rows under the time to first token: ms per generated token and peak device memory."""
    def per_token(row):
        if row is None or row.get("ms_per_token") is None:
            return "–"
        text = f"{row['ms_per_token']:.2f}"
        if base is not None and row is not base and row["ms_per_token"] and base.get("ms_per_token"):
            text += f" ({base['ms_per_token'] / row['ms_per_token']:.2f}x)"
        return text

    device = next((r.get("device") for r in speed_rows if r and r.get("device")), "?")
    lines = [f"| ms per generated token ({device}) | " + " | ".join(per_token(r) for r in speed_rows) + " |"]
    if any(r and r.get("peak_bytes") for r in speed_rows):
        lines.append("| peak device memory | " + " | ".join(_fmt_kv(r.get("peak_bytes") if r else None, None) for r in speed_rows) + " |")
    return lines


def _describe_variant(info: dict | None) -> str:
    if not info or info.get("recipe") is None and not info.get("strategy_counts"):
        return "the unpatched model (dense attention)"
    parts = []
    counts = info.get("strategy_counts") or {}
    if counts:
        parts.append("heads: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for key, label in (("calibration_seq_len", "calibrated at"), ("calibrated_sparsity", "sparsity at calibration")):
        if info.get(key) is not None:
            parts.append(f"{label} {info[key]}")
    if info.get("uniform"):
        parts.append("uniform budget: " + info["uniform"])
    return "; ".join(parts) or "patched"


def render_markdown(results: dict) -> str:
    variants = list(results["variants"])
    rows = _rows(results)
    has_base = BASELINE in variants
    env = results.get("environment", {})
    lines = [
        "# patchattn eval",
        "",
        f"Model: {results['model']} · trials per task: {results['trials']} · seed: {results['seed']}"
        + (f" · torch {env['torch']}, transformers {env['transformers']} on {env['device']} ({env.get('dtype')})" if env else ""),
        "",
        "Accuracy is the fraction of trials answered correctly (higher is better); perplexity is on held-out "
        "State of the Union prose (lower is better); sparsity is the share of causal query-key blocks the "
        "variant skipped in prefill attention."
        + (f" Brackets: difference from `{BASELINE}` on the same prompts." if has_base else ""),
    ]
    if results.get("complete") is False:
        lines += ["", f"**Partial results**: the run was interrupted after {len(results['results'])} result rows; "
                  "missing cells were not measured."]
    lines += ["", "## Variants", ""]
    for name, info in results["variants"].items():
        lines.append(f"- `{name}`: {_describe_variant(info)}")
    for length in results["lengths"]:
        lines += ["", f"## {length} tokens", "", "| task | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
        tasks = [t for t in results["tasks"] if any((length, t, v) in rows for v in variants)]
        for task in tasks:
            base = rows.get((length, task, BASELINE))
            cells = []
            for v in variants:
                row = rows.get((length, task, v))
                cells.append(_fmt_value(row) + ("" if v == BASELINE else _fmt_delta(row, base)))
            lines.append(f"| {TASK_TITLES.get(task, task)} | " + " | ".join(cells) + " |")
            if task == "speed":
                lines += _speed_lines([rows.get((length, task, v)) for v in variants], base)
        sparsity = [_mean_sparsity([rows[k] for k in rows if k[0] == length and k[2] == v]) for v in variants]
        lines.append("| *sparsity* | " + " | ".join(_fmt_sparsity(s) for s in sparsity) + " |")
        kv = [_mean_kv([rows[k] for k in rows if k[0] == length and k[2] == v]) for v in variants]
        if any(x is not None for x in kv):
            lines.append("| *KV cache at end of generation* | " + " | ".join(_fmt_kv(x, kv[variants.index(BASELINE)] if has_base else None) for x in kv) + " |")
    return "\n".join(lines) + "\n"


# ---- figure ---------------------------------------------------------------------------------------
def render_png(results: dict) -> bytes:
    """Accuracy per task vs length (one line per variant), and a perplexity panel; PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(results["tasks"]) or ["ppl"]
    variants = list(results["variants"])
    rows = _rows(results)
    lengths = results["lengths"]
    ncols = min(3, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks):
        for v in variants:
            points = [(n, rows[(n, task, v)]["value"]) for n in lengths if (n, task, v) in rows]
            if not points:
                continue
            sparsity = _mean_sparsity([r for k, r in rows.items() if k[2] == v])
            label = v if sparsity is None or v == BASELINE else f"{v} ({100 * sparsity:.0f}% sparse)"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_title(TASK_TITLES.get(task, task))
        ax.set_xlabel("context length (tokens)")
        if len(lengths) > 1 and max(lengths) / min(lengths) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        if task == "ppl":
            ax.set_ylabel("perplexity (lower is better)")
        else:
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    if variants:
        axes[0].legend(fontsize="small")
    fig.suptitle(f"patchattn eval: {results['model']}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
