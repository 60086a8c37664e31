"""Questions asked of an eval's results dict (``run_eval``'s): its rows by (length, task, variant), which tasks are
built in, the speed rows, means over rows, and which machine the times come from. Tables and plots both read them."""

from __future__ import annotations

from .ppl_texts import is_ppl_text_task

BASELINE = "dense"
TASK_TITLES = {
    "ppl": "perplexity",
    "passkey": "passkey (filler)",
    "single": "single needle",
    "multikey": "multi-key needle",
    "multivalue": "multi-value needle",
    "multiquery": "multi-query needle",
    "vartrack": "variable tracking",
    "speed": "time to first token (ms)",
}
SPEED_TASK = "speed"


def rows_by_key(results: dict) -> dict[tuple, dict]:
    return {(r.get("length"), r["task"], r["variant"]): r for r in results["results"]}


def known_tasks(results: dict) -> list[str]:
    """The built-in tasks of this run (in run order), speed excluded; other rows belong to lm-eval."""
    return [t for t in results["tasks"] if t in TASK_TITLES and t != SPEED_TASK]


def other_rows(results: dict) -> list[dict]:
    """Rows of tasks patchattn does not define itself (lm-eval's), in the order they came."""
    return [r for r in results["results"] if r["task"] not in TASK_TITLES and not is_ppl_text_task(r["task"])]


def mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def variant_sparsity(results: dict, variant: str, task: str | None = None) -> float | None:
    """Mean prefill sparsity of a variant over its rows (of one task, if given)."""
    return mean_of([r for r in results["results"] if r["variant"] == variant and (task is None or r["task"] == task)], "sparsity")


def speed_rows(results: dict) -> list[dict]:
    return [r for r in results["results"] if r["task"] == SPEED_TASK]


def device_label(results: dict) -> str:
    """'CPU figures (model, N threads)' or 'CUDA figures (GPU name)': which machine the times come from."""
    env = results.get("environment") or {}
    device = next((r.get("device") for r in speed_rows(results) if r.get("device")), None) or env.get("device") or "cpu"
    kind = device.split(":")[0]
    name = env.get("device_name")
    detail = ", ".join(x for x in (name, f"{env['threads']} threads" if kind == "cpu" and env.get("threads") else None) if x)
    return f"{kind.upper()} figures" + (f" ({detail})" if detail else "")
