"""The report's tables as plain cells, computed once from a results dict and rendered by each front end:
results.md (report.py), report.html (html.py) and the terminal (cli/eval_run.py, through Rich).

Every cell is already formatted text; a renderer only lays the cells out (and escapes them). A first cell in
``*asterisks*`` names a derived row (sparsity, KV cache), which a renderer may set in italics. The cells' formats
live in cells.py, the lookups of the results dict in results.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import MAX_TOKENS

from .cells import (  # noqa: F401  (NOT_BUDGETED and paired_flips are read from here too)
    NOT_BUDGETED, fmt_bytes, fmt_delta, fmt_kernels, fmt_kv, fmt_number, fmt_sparsity, fmt_speedup, fmt_value, kv_note,
    paired_flips,
)
from .ppl_texts import PPL_TEXT_PREFIX
from .results import (
    BASELINE, SPEED_TASK, TASK_TITLES, device_label, known_tasks, mean_of, other_rows, rows_by_key, speed_rows,
    variant_sparsity,
)

SHIPPED_TEXT = "held-out prose"  # the ppl task's text, in the per-text table
PEAK_MEMORY_TITLES = {"cuda_allocated": "peak CUDA memory allocated", "process_rss": "peak process RSS"}


@dataclass
class ReportTable:
    """One table: ``columns`` headers, ``rows`` of formatted cells (first column left-aligned, the rest right)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


def derived_label(cell: str) -> str | None:
    """The label of a derived row's first cell (``*sparsity*`` -> ``sparsity``), None for an ordinary cell."""
    return cell[1:-1] if len(cell) > 2 and cell.startswith("*") and cell.endswith("*") else None


def summary_table(results: dict) -> ReportTable:
    """One row per variant: sparsity, KV cache and speed at the longest length, each against dense."""
    rows = rows_by_key(results)
    variants = list(results["variants"])
    longest = max(results["lengths"]) if results["lengths"] else None
    has_base = BASELINE in variants

    def cells_at_longest(variant: str, task: str | None = None) -> list[dict]:
        return [r for (n, t, v), r in rows.items() if n == longest and v == variant and (task is None or t == task)]

    def at_longest(variant: str, task: str | None, key: str):
        return mean_of(cells_at_longest(variant, task), key)

    base_kv = at_longest(BASELINE, None, "kv_bytes") if has_base else None
    base_ttft = at_longest(BASELINE, SPEED_TASK, "value") if has_base else None
    base_tok = at_longest(BASELINE, SPEED_TASK, "ms_per_token") if has_base else None
    table = ReportTable(
        "Variants",
        ["variant", "prefill sparsity", f"KV cache at {longest} tokens", f"time to first token at {longest} (ms)", f"ms per token at {longest}",
         "prefill kernels"],
        note=" ".join(
            ["Sparsity: mean over every row of the variant."]
            + (["Prefill kernels: share of the patched layers' prefill calls each implementation ran in the timed runs "
                "(without speed runs, in every task) (gluon-hopper: the warp-specialised kernel for Hopper GPUs; triton; torch: "
                "the PyTorch reference; sdpa: dense attention, for layers the recipe keeps dense or, under backend auto, where "
                "no sparse kernel runs on this device; the quality tasks run the recipe's layouts whatever the device)."] if any(r.get("prefill_kernels") for r in results["results"]) else [])
            + ([f"Brackets: change from `{BASELINE}` (speed: times faster)."] if has_base else [])
            + ([f"Speed: {device_label(results)}."] if speed_rows(results) else [])
            + kv_note([r for v in variants for r in cells_at_longest(v)])
        ),
    )
    for v in variants:
        ttft = at_longest(v, SPEED_TASK, "value")
        per_token = at_longest(v, SPEED_TASK, "ms_per_token")
        table.rows.append([
            v,
            fmt_sparsity(variant_sparsity(results, v)),
            fmt_kv(cells_at_longest(v), None if v == BASELINE else base_kv),
            "–" if ttft is None else f"{ttft:.1f}" + ("" if v == BASELINE else fmt_speedup(ttft, base_ttft)),
            "–" if per_token is None else f"{per_token:.2f}" + ("" if v == BASELINE else fmt_speedup(per_token, base_tok)),
            fmt_kernels(results, v),
        ])
    keep = [i for i in range(len(table.columns)) if i < 2 or any(row[i] != "–" for row in table.rows)]  # drop unmeasured
    table.columns = [table.columns[i] for i in keep]
    table.rows = [[row[i] for i in keep] for row in table.rows]
    return table


def accuracy_tables(results: dict) -> list[ReportTable]:
    """Per length: each built-in task's score per variant (difference from dense), then sparsity and KV bytes."""
    rows = rows_by_key(results)
    variants = list(results["variants"])
    has_base = BASELINE in variants
    tables = []
    for length in results["lengths"]:
        table = ReportTable(f"{length} tokens", ["task", *variants])
        for task in known_tasks(results):
            if not any((length, task, v) in rows for v in variants):
                continue
            base = rows.get((length, task, BASELINE))
            cells = [fmt_value(rows.get((length, task, v))) + ("" if v == BASELINE else fmt_delta(rows.get((length, task, v)), base)) for v in variants]
            table.rows.append([TASK_TITLES[task], *cells])
        at_length = lambda v: [r for (n, _, name), r in rows.items() if n == length and name == v]  # noqa: E731
        table.rows.append(["*sparsity*", *[fmt_sparsity(mean_of(at_length(v), "sparsity")) for v in variants]])
        kv = [mean_of(at_length(v), "kv_bytes") for v in variants]
        if any(x is not None for x in kv):
            base_kv = kv[variants.index(BASELINE)] if has_base else None
            table.rows.append(["*KV cache at end of generation*", *[fmt_kv(at_length(v), base_kv) for v in variants]])
            table.note = " ".join(filter(None, [table.note, *kv_note([r for v in variants for r in at_length(v)])]))
        tables.append(table)
    return tables


def ppl_text_table(results: dict) -> ReportTable | None:
    """Perplexity per text (the shipped held-out prose, then each ``--ppl-text`` file) and length: per variant its
    perplexity (difference from dense) and, but for dense, the prefill sparsity it reached there; None without texts."""
    texts = results.get("ppl_texts") or []
    if not texts:
        return None
    rows = rows_by_key(results)
    variants = list(results["variants"])
    columns = ["text", "length"]
    for v in variants:
        columns += [v] if v == BASELINE else [v, f"{v} sparsity"]
    skipped = [f"{t['name']} at {', '.join(map(str, t['skipped_lengths']))} tokens" for t in texts if t.get("skipped_lengths")]
    table = ReportTable("Perplexity per text", columns, note=" ".join(
        [f"Perplexity (lower is better) of `{SHIPPED_TEXT}` (shipped State of the Union prose) and of each text given;"
         " sparsity: the share of causal query-key blocks the variant skipped in prefill on that text."]
        + ([f"Brackets: difference from `{BASELINE}` on the same windows."] if BASELINE in variants else [])
        + ["Texts: " + "; ".join(f"`{t['name']}` {t['path']} ({t['tokens']} tokens)" for t in texts) + "."]
        + ([f"–: not measured, the text is shorter than the length ({'; '.join(skipped)})."] if skipped else [])
    ))
    sources = [("ppl", SHIPPED_TEXT)] if any(task == "ppl" for _, task, _ in rows) else []
    sources += [(PPL_TEXT_PREFIX + t["name"], t["name"]) for t in texts]
    for task, label in sources:
        for length in results["lengths"]:
            base = rows.get((length, task, BASELINE))
            cells = []
            for v in variants:
                row = rows.get((length, task, v))
                cells.append(fmt_value(row) + ("" if v == BASELINE else fmt_delta(row, base)))
                if v != BASELINE:
                    cells.append(fmt_sparsity(row and row.get("sparsity")))
            table.rows.append([label, str(length), *cells])
    return table


def speed_table(results: dict) -> ReportTable | None:
    """Per length and variant: time to first token, ms per generated token, peak memory, KV cache; None without
    speed rows."""
    speed = speed_rows(results)
    if not speed:
        return None
    base = {r["length"]: r for r in speed if r["variant"] == BASELINE}
    kinds = {r.get("peak_memory") for r in speed if r.get("peak_memory")}
    peak_title = " / ".join(PEAK_MEMORY_TITLES.get(k, k) for k in sorted(kinds)) or "peak memory"
    runs = results.get("speed_runs")
    decode = next((r.get("decode_tokens") for r in speed if r.get("decode_tokens")), None)
    note = (
        f"{device_label(results)}. Medians of {runs or 'several'} timed runs after a warm-up run"
        + ("; times to first token from rounds that run each variant in turn (generate to its first token)"
           if results.get("ttft_interleaved") else "")
        + (f"; ms per token over {decode} generated tokens after the first" if decode else "")
        + ". Decode: how the steps ran (cuda-graph: a patched model's whole step replayed, its norms and MLPs compiled; torch.compile: generate's "
        "compile path for a static cache; eager)."
        + " Brackets: times faster than dense, or KV cache change."
    )
    if "process_rss" in kinds:
        note += " Peak process RSS is the whole process's resident memory during one generation (weights included)."
    table = ReportTable(f"Speed and memory — {device_label(results)}", ["length", "variant", "time to first token (ms)", "ms per generated token", "decode", peak_title, "KV cache"], note=note)
    for row in sorted(speed, key=lambda r: (r["length"], list(results["variants"]).index(r["variant"]) if r["variant"] in results["variants"] else 0)):
        b = None if row["variant"] == BASELINE else base.get(row["length"])
        table.rows.append([
            str(row["length"]),
            row["variant"],
            f"{row['value']:.1f}" + fmt_speedup(row["value"], b and b["value"]),
            "–" if row.get("ms_per_token") is None else f"{row['ms_per_token']:.2f}" + fmt_speedup(row["ms_per_token"], b and b.get("ms_per_token")),
            row.get("decode") or "–",
            fmt_bytes(row.get("peak_bytes")),
            fmt_kv([row], b and b.get("kv_bytes")),
        ])
    table.note = " ".join([table.note, *kv_note(speed), *break_even_note(results)])
    return table


def break_even_note(results: dict) -> list[str]:
    """One sentence per variant whose speed rows ran with a prefill break-even eval fitted on this device."""
    notes = []
    for name, info in results.get("variants", {}).items():
        fitted = (info or {}).get("speed_break_even")
        if not fitted:
            continue
        floors = [n for n in fitted.get("layer_min_tokens") or [] if n]
        finite = [n for n in floors if n < MAX_TOKENS]
        parts = [f"layers prefill densely below {min(finite)}-{max(finite)} tokens"] if finite else []
        if len(finite) < len(floors):
            parts.append(f"{len(floors) - len(finite)} layer(s) always densely")
        span = "; ".join(parts) or "sparse at every length"
        notes.append(f"{name} had no prefill break-even for this device: eval timed each layer at "
                     f"{', '.join(map(str, fitted['lengths']))} tokens first, and its speed rows ran with it ({span}).")
    return notes


def other_table(results: dict) -> ReportTable | None:
    """Rows of tasks patchattn does not define (lm-eval's), generically: task, metric, length, one column per
    variant; None when there are none."""
    extra = other_rows(results)
    if not extra:
        return None
    variants = list(results["variants"])
    cells: dict[tuple, dict[str, dict]] = {}
    for r in extra:
        cells.setdefault((r["task"], r.get("metric") or "", r.get("length")), {})[r["variant"]] = r
    table = ReportTable("lm-eval tasks", ["task", "metric", "length", *variants], note="Scores as lm-eval reports them; ± its standard error where given.")
    for (task, metric, length), by_variant in cells.items():
        values = []
        for v in variants:
            row = by_variant.get(v)
            text = "–" if row is None else fmt_number(row.get("value"))
            if row is not None and row.get("stderr") is not None:
                text += f" ± {fmt_number(row['stderr'])}"
            values.append(text)
        table.rows.append([str(task), str(metric), "–" if length is None else str(length), *values])
    return table


def describe_variant(info: dict | None) -> str:
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
    if info.get("kv_policy_counts"):
        parts.append("KV heads: " + ", ".join(f"{k} {v}" for k, v in sorted(info["kv_policy_counts"].items())))
    return "; ".join(parts) or "patched"


def all_tables(results: dict) -> list[ReportTable]:
    """Summary, per-length accuracy, per-text perplexity, speed and lm-eval tables, in report order (absent ones left
    out)."""
    tables = (summary_table(results), *accuracy_tables(results), ppl_text_table(results), speed_table(results), other_table(results))
    return [t for t in tables if t is not None]

