"""The report's figures as PNG bytes (matplotlib's Agg canvas, no display needed).

- ``render_png``: each built-in task's score against context length, one line per variant (results.png);
- ``render_accuracy_vs_sparsity``: each task's score against the variant's prefill sparsity, one line per length;
- ``render_speed_vs_length``: time to first token, ms per generated token and KV cache against length.

Each returns None when the results hold nothing to draw (e.g. no speed rows).
"""

from __future__ import annotations

import io

from .results import BASELINE, SPEED_TASK, TASK_TITLES, device_label, known_tasks, rows_by_key, speed_rows, variant_sparsity

VARIANT_MARKERS = "osD^vP*X"
FILES = {"png": "results.png", "accuracy_png": "accuracy_vs_sparsity.png", "speed_png": "speed_vs_length.png"}


def _figure(n_panels: int, title: str, max_cols: int = 3):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(max_cols, n_panels)
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n_panels]


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _length_axis(ax, lengths: list[int]) -> None:
    ax.set_xlabel("context length (tokens)")
    if len(lengths) > 1 and max(lengths) / min(lengths) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.grid(alpha=0.3)


def _score_axis(ax, task: str) -> None:
    if task == "ppl":
        ax.set_ylabel("perplexity (lower is better)")
    else:
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)


def render_png(results: dict) -> bytes | None:
    """Each built-in task's score against length (one line per variant); PNG bytes."""
    tasks = known_tasks(results)
    if not tasks:
        return None
    rows = rows_by_key(results)
    lengths = results["lengths"]
    fig, axes = _figure(len(tasks), f"patchattn eval: {results['model']}")
    for ax, task in zip(axes, tasks):
        for v in results["variants"]:
            points = [(n, rows[(n, task, v)]["value"]) for n in lengths if (n, task, v) in rows]
            if not points:
                continue
            sparsity = variant_sparsity(results, v)
            label = v if sparsity is None or v == BASELINE else f"{v} ({100 * sparsity:.0f}% sparse)"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_title(TASK_TITLES.get(task, task))
        _length_axis(ax, lengths)
        _score_axis(ax, task)
    _legend(axes[0])
    return _png(fig)


def render_accuracy_vs_sparsity(results: dict) -> bytes | None:
    """Each built-in task's score against the prefill sparsity each variant reached on it (dense at 0): a
    marker per variant, a colour (and a line through the variants in order of sparsity) per length."""
    from matplotlib.lines import Line2D

    tasks = known_tasks(results)
    if not tasks:
        return None
    rows = rows_by_key(results)
    markers = {v: VARIANT_MARKERS[i % len(VARIANT_MARKERS)] for i, v in enumerate(results["variants"])}
    fig, axes = _figure(len(tasks), f"accuracy vs sparsity: {results['model']}")
    for ax, task in zip(axes, tasks):
        for i, length in enumerate(results["lengths"]):
            points = sorted(
                (100 * (r.get("sparsity") or 0.0), r["value"], v)
                for (n, t, v), r in rows.items() if n == length and t == task and r.get("value") is not None
            )
            ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{i}", alpha=0.5)
            for x, y, v in points:
                ax.plot([x], [y], color=f"C{i}", marker=markers[v], linestyle="none")
        ax.set_title(TASK_TITLES.get(task, task))
        ax.set_xlabel("prefill sparsity (%)")
        ax.set_xlim(-5, 105)
        ax.grid(alpha=0.3)
        _score_axis(ax, task)
    handles = [Line2D([], [], color=f"C{i}", label=f"{n} tokens") for i, n in enumerate(results["lengths"])]
    handles += [Line2D([], [], color="0.35", marker=m, linestyle="none", label=v) for v, m in markers.items()]
    axes[0].legend(handles=handles, fontsize="x-small")
    return _png(fig)


def render_speed_vs_length(results: dict) -> bytes | None:
    """Time to first token, ms per generated token and the KV cache against length, one line per variant."""
    speed = speed_rows(results)
    if not speed:
        return None
    lengths = sorted({r["length"] for r in speed})
    panels = [("value", "time to first token (ms)", 1.0), ("ms_per_token", "ms per generated token", 1.0), ("kv_bytes", "KV cache (MiB)", 2**-20)]
    fig, axes = _figure(len(panels), f"speed vs length: {results['model']} — {device_label(results)}")
    by_key = rows_by_key(results)
    for ax, (key, title, scale) in zip(axes, panels):
        for v in results["variants"]:
            points = [(n, by_key[(n, SPEED_TASK, v)].get(key)) for n in lengths if (n, SPEED_TASK, v) in by_key]
            points = [(n, y * scale) for n, y in points if y is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=v)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        _length_axis(ax, lengths)
    _legend(axes[0])
    return _png(fig)


RENDERERS = {"png": render_png, "accuracy_png": render_accuracy_vs_sparsity, "speed_png": render_speed_vs_length}
