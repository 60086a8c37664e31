"""The report's cells as formatted text: values, differences from the baseline (with paired flips), speed-ups,
sparsity, bytes, the KV cache and the prefill kernels; ``–`` for what was not measured."""

from __future__ import annotations

from math import comb

from .results import mean_of

def fmt_value(row: dict | None) -> str:
    return "–" if row is None or row.get("value") is None else f"{row['value']:.2f}"


def fmt_delta(row: dict | None, base: dict | None) -> str:
    """' (+0.20)' for accuracy, ' (+0.31, +1.4%)' for perplexity: the difference from the baseline row. Accuracy on
    the same prompts also says how many prompts flipped each way and how likely flips that one-sided are by chance
    (' (−0.05, 6 lost / 1 won, p=0.12)', :func:`flip_p_value`): a difference made of one-way flips is the variant's,
    one of as many won as lost is noise."""
    if row is None or base is None or row.get("value") is None or base.get("value") is None:
        return ""
    delta = row["value"] - base["value"]
    text = f"{'+' if delta >= 0 else '−'}{abs(delta):.2f}"
    if row.get("metric") == "perplexity" and base["value"]:
        text += f", {100 * delta / base['value']:+.1f}%"
    flips = paired_flips(row, base)
    if flips is not None and any(flips):
        text += f", {flips[0]} lost / {flips[1]} won, p={flip_p_value(*flips):.2g}"
    return f" ({text})"


def paired_flips(row: dict, base: dict) -> tuple[int, int] | None:
    """(prompts the baseline answered and the variant missed, the reverse), where both scored the same prompts
    right or wrong (scores 0 or 1); None otherwise."""
    a, b = base.get("scores") or [], row.get("scores") or []
    if row.get("metric") == "perplexity" or not a or len(a) != len(b) or any(x not in (0, 1) for x in (*a, *b)):
        return None
    return sum(1 for x, y in zip(a, b) if x > y), sum(1 for x, y in zip(a, b) if y > x)


def flip_p_value(lost: int, won: int) -> float:
    """McNemar's exact test on paired flips: the two-sided chance of a split at least as one-sided as ``lost`` /
    ``won`` if each flipped prompt had gone either way at even odds (1.0 for an even split or none)."""
    n = lost + won
    tail = sum(comb(n, i) for i in range(min(lost, won) + 1)) / 2**n
    return min(1.0, 2 * tail)


def fmt_speedup(value: float | None, base: float | None) -> str:
    """' (1.50x)': how many times faster than the baseline (a time: lower is better)."""
    return f" ({base / value:.2f}x)" if value and base else ""


def fmt_sparsity(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def fmt_bytes(value: float | None, base: float | None = None) -> str:
    if value is None:
        return "–"
    unit, scale = next((u, x) for u, x in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if value >= x or u == "KiB")
    text = f"{value / scale:.1f} {unit}"
    if base and value != base:
        text += f" ({100 * (value - base) / base:+.0f}%)"
    return text


NOT_BUDGETED = " · full cache†"
NOT_BUDGETED_NOTE = ("†: the recipe compresses the KV cache but these generations ran on the full one (why: each row's "
                     "`kv_cache` in results.json), so the bytes are not the recipe's.")


def fmt_kv(rows: list[dict], base: float | None = None) -> str:
    """The mean KV bytes of ``rows`` (change from ``base``), marked when any ran on the full cache though its recipe
    compresses it (see :func:`patchattn.cache_hooks.kv_cache_status`)."""
    text = fmt_bytes(mean_of(rows, "kv_bytes"), base)
    return text + NOT_BUDGETED if any(str(r.get("kv_cache") or "").startswith("full") for r in rows) else text


def kv_note(rows: list[dict]) -> list[str]:
    """The footnote a table needs when any of its ``rows`` ran on the full cache though its recipe compresses it."""
    return [NOT_BUDGETED_NOTE] if any(str(r.get("kv_cache") or "").startswith("full") for r in rows) else []


def fmt_kernels(results: dict, variant: str) -> str:
    """'gluon-hopper 67% · sdpa 33%': how the variant's patched prefill calls split over implementations, in its timed
    runs where it has any (what its speed figures ran: on a device without sparse kernels, dense), else in every task."""
    rows = [r for r in results["results"] if r["variant"] == variant]
    timed = [r for r in rows if r["task"] == "speed" and r.get("prefill_kernels")]
    counts: dict[str, int] = {}
    for row in timed or rows:
        for name, n in (row.get("prefill_kernels") or {}).items():
            counts[name] = counts.get(name, 0) + n
    total = sum(counts.values())
    if not total:
        return "–"
    return " · ".join(f"{name} {100 * n / total:.0f}%" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def fmt_number(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)
