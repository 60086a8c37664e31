"""What ``calibrate`` prints about the recipe it wrote: the per-layer choice, the per-kind table, the loss-bound
search and the verified lengths, and the warning when the heads' outputs are far from dense."""

from __future__ import annotations

from rich.table import Table

from .app import console

# Mean relative error of the heads' attention outputs above which calibrate warns (SmolLM2-135M, 80% sparsity:
# 0.054 at 8K gave +2.8% perplexity, 0.25 at 2K gave +63%; examples/smollm2-8k-token-columns, smollm2-two-gpus).
HIGH_OUTPUT_ERROR = 0.15


def _print_needles(recipe) -> None:
    """One line on the needle check: how many heads read a needle's answer from far back, how many of them stream."""
    needles = recipe.calibration.get("needles")
    if not needles:
        return
    heads = needles["heads"]
    streaming = sum(recipe.layers[layer][head].strategy == "streaming" for layer, head, _ in heads)
    console.print(f"needles: {len(heads)} heads read {needles['reach_share']:.0%} or more of an answer from over half the "
                  f"prompt back ({needles['prompts']} prompts); {streaming} of them still stream, where the window kept "
                  f"their answer rows close to dense")


def _print_recipe(recipe) -> None:
    probe = recipe.calibration.get("probe")
    caption = ("answer / NLL: what the layer's first-pass plan alone cost the probes (drop of the answer's log-probability, "
               "rise of the text's NLL a token); weight: the layer's utility weight in the second allocation") if probe else None
    if recipe.layer_min_tokens:
        device = recipe.calibration.get("break_even", {}).get("device", "this device")
        caption = ((caption + "; ") if caption else "") + (f"dense below: prompts shorter than this prefill the layer densely "
                                                            f"(its sparse path lost to dense attention on {device})")
    table = Table(title=f"recipe {recipe.name}: per-layer choice", show_lines=False, caption=caption)
    rises = probe.get("layer_nll_rise") if probe else None  # recipes probed before the NLL term have none
    probe_cols = (("answer", *(("NLL",) if rises else ()), "weight") if probe else ())
    break_even = recipe.layer_min_tokens
    columns = ("layer", "density", "kept mass", "output err", *probe_cols, *(("dense below",) if break_even else ()), "strategies")
    for col in columns:
        table.add_column(col, justify="right" if col != "strategies" else "left")
    windows = recipe.calibration.get("model_windows", {})
    for li, heads in enumerate(recipe.layers):
        counts: dict[str, int] = {}
        for h in heads:
            counts[h.strategy] = counts.get(h.strategy, 0) + 1
        mean = lambda xs: sum(xs) / len(xs) if xs and None not in xs else float("nan")  # noqa: E731
        table.add_row(
            str(li),
            f"{mean([h.density for h in heads]):.3f}",
            f"{mean([h.kept_mass for h in heads]):.3f}",
            f"{mean([h.output_error for h in heads]):.3f}",
            *((f"{probe['layer_drop'][li]:+.3f}", *((f"{rises[li]:+.4f}",) if rises else ()), f"{probe['layer_weight'][li]:.2f}") if probe else ()),
            *((f"{break_even[li]}" if break_even[li] else "–",) if break_even else ()),
            f"the model's own window of {windows[str(li)]}" if str(li) in windows else ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        )
    console.print(table)
    cal = recipe.calibration
    console.print(
        f"target sparsity {cal.get('target_sparsity')}, achieved {cal.get('achieved_sparsity')}, "
        f"mean kept mass {cal.get('mean_kept_mass')}, heads {recipe.strategy_counts()}"
    )
    _print_needles(recipe)
    _print_kinds(cal)
    _print_search(recipe)
    error = cal.get("mean_output_error")
    if error is not None and error > HIGH_OUTPUT_ERROR and "max_loss" not in cal:
        console.print(
            f"[yellow]warning: the heads' attention outputs are off by {error:.0%} on average on the calibration text; expect a "
            f"large quality loss (SmolLM2 at 8K and 80%: 5%, perplexity +2.8%; at 2K and 80%: 25%, perplexity +63%). "
            f"Lower --target-sparsity or calibrate longer prompts (--seq-len).[/]"
        )
    kv = cal.get("kv")
    if kv:
        console.print(
            f"KV cache: budget {kv['budget']}, achieved {kv['achieved']}, mean kept mass {kv['mean_kept_mass']}, "
            f"output error {kv['mean_output_error']}, KV heads {kv['policies']}"
        )
    _print_kv_search(cal)


def _print_kv_search(cal: dict) -> None:
    """With --max-loss and --kv-budget: each KV budget tried, the loss of held-out text decoded through its cache."""
    steps = cal.get("kv_search")
    if not steps:
        return
    kv = cal["kv"]
    table = Table(title=f"KV budget within the bound (the last {kv['continuation_tokens']} tokens of {kv['windows']} held-out "
                        "window(s) decoded through the cache)")
    for col in ("budget", "kept", "perplexity", "within"):
        table.add_column(col, justify="right")
    for step in steps:
        table.add_row(f"{step['budget']:.3f}", f"{step['kept']:.3f}", f"{100 * step['ppl_loss']:+.2f}%",
                      "[green]yes[/]" if step["within"] else "[red]no[/]")
    console.print(table)
    if kv["budget"] > kv["asked_budget"] + 1e-9:
        console.print(f"[yellow]the KV plans at --kv-budget {kv['asked_budget']} lost more than the bound: the recipe keeps "
                      f"{kv['budget']:.3f} of the cache[/]")


def _print_search(recipe) -> None:
    """The loss-bound search (each target tried, its measured perplexity rise) and the lengths the recipe was verified
    at, when the recipe was calibrated with --max-loss."""
    cal = recipe.calibration
    if "max_loss" not in cal:
        return
    bound = cal["max_loss"]["ppl"]
    mark = lambda ok: "[green]yes[/]" if ok else "[red]no[/]"  # noqa: E731
    kinds = "kinds" in cal  # the perplexity is the worst kind's; the table says which
    answers = any("answer_drop" in step for step in cal["search"])  # probes ran: their answers' drop, in nats
    answer_bound = cal["max_loss"].get("answer")
    title = f"search for perplexity within +{100 * bound:.3g}%" + ("" if answer_bound is None else f" and answers within {answer_bound:g} nats")
    search = Table(title=f"{title} (verified on {cal['verified_on']})",
                   caption="answer drop: the mean log-probability the layer probes' answers lost (nats)" if answers else None)
    for col in ("target sparsity", "achieved", "perplexity", *(("worst kind",) if kinds else ()), *(("answer drop",) if answers else ()), "within"):
        search.add_column(col, justify="right")
    for step in cal["search"]:
        drop = step.get("answer_drop")
        search.add_row(f"{step['target']:.3f}", f"{step['sparsity']:.3f}", f"{100 * step['ppl_loss']:+.2f}%",
                       *((_worst_kind(step),) if kinds else ()), *((("-" if drop is None else f"{drop:+.3f}"),) if answers else ()),
                       mark(step["within"]))
    console.print(search)
    if not cal.get("verified"):
        console.print(f"[yellow]warning: no sparse recipe kept perplexity within +{100 * bound:.3g}% at {cal['seq_len']} tokens: "
                      "the recipe is dense. Calibrate longer prompts (--seq-len) or allow more loss (--max-loss).[/]")
        return
    lengths = Table(title="verified lengths")
    for col in ("length", "prefill sparsity", "perplexity", *(("worst kind",) if kinds else ()), "within", "runs"):
        lengths.add_column(col, justify="right")
    for row in cal["verified"]:
        sparsity = "-" if row["sparsity"] is None else f"{row['sparsity']:.3f}"
        lengths.add_row(str(row["length"]), sparsity, f"{100 * row['ppl_loss']:+.2f}%", *((_worst_kind(row),) if kinds else ()),
                        mark(row["within"]), "sparse" if row["sparse"] else "dense")
    console.print(lengths)
    console.print(f"prompts shorter than {recipe.min_sparse_tokens} tokens prefill densely (below that the loss was not "
                  f"within the bound, or not verified); `patchattn eval` runs the verified lengths by default")


def _percent(rise: float | None) -> str:
    """A perplexity rise as a signed percentage; "-" where it was not measured (another kind was over the bound)."""
    return "-" if rise is None else f"{100 * rise:+.2f}%"


def _worst_kind(row: dict) -> str:
    """The kind of text whose loss a search step or verified length was measured by (the worst)."""
    by_kind = row.get("ppl_loss_by_kind") or {}
    return max(by_kind, key=by_kind.get) if by_kind else "-"


def _print_kinds(cal: dict) -> None:
    """Per kind of text, when the recipe was calibrated on several: tokens scored, the sparsity the allocation reaches on
    that kind's scores, and (with --max-loss, or a fixed target) the recipe's perplexity rise on its held-out text."""
    kinds = cal.get("kinds")
    if not kinds:
        return
    loss = "max_loss" in cal or "measured" in cal
    table = Table(title=f"per kind of text (allocation robust over kinds: {cal.get('robust')}, at {cal['seq_len']} tokens)")
    for col in ("kind", "text", "scored tokens", "sparsity", *(("perplexity",) if loss else ())):
        table.add_column(col, justify="left" if col in ("kind", "text") else "right")
    for kind, entry in kinds.items():
        table.add_row(kind, entry.get("text", ""), str(entry["scored_tokens"]), f"{entry['achieved_sparsity']:.3f}",
                      *((_percent(entry.get("ppl_loss")),) if loss else ()))
    console.print(table)
