"""``patchattn calibrate``: its options, then one calibration with a progress bar, the recipe (and its heat map and
uniform baseline) written and printed."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import OptionError, PatchattnError
from .app import DEBUG_OPTION, DEVICE_MAP_HELP, MODEL_HELP, _comma_list, _progress, _run, app, console
from .calibrate_tables import _print_recipe


@app.command()
def calibrate(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    target_sparsity: Optional[float] = typer.Option(None, "--target-sparsity", "-s", help="Fraction of causal query-key blocks to skip, averaged over heads, whatever it costs (instead of --max-loss)."),
    max_loss: Optional[str] = typer.Option(
        None, "--max-loss", help="The quality loss to stay within, e.g. ppl=2% (or ppl=2%,answer=0.5: the layer probes' answers may also lose at most 0.5 nats of log-probability on average; needs --probes): the sparsest recipe whose perplexity on held-out calibration text rises at most that much, verified with patched forwards at the calibration length and shorter ones (dense below the shortest within the bound). Default when --target-sparsity is not given: ppl=2%."
    ),
    seq_len: int = typer.Option(4096, "--seq-len", "-n", help="Calibration length in tokens."),
    output: Path = typer.Option(Path("recipe.json"), "--output", "-o", help="Recipe JSON to write."),
    block_size: int = typer.Option(64, "--block-size", help="Block size of the layouts (tokens)."),
    strategies: str = typer.Option("dense,streaming,vertical_slash_spread,block_topk", "--strategies", help="Comma-separated strategies to choose from (also: vertical_slash, estimated from the prompt's last 64 queries only (MInference); vertical_slash_tokens, fixed token columns, best in-sample but the first to lose on kinds of text calibration never read; vertical_slash_adaptive; vertical_slash_topk, spread vertical-slash and block top-k in one head)."),
    objective: str = typer.Option("output", "--objective", help="What to keep most of: attention 'output' accuracy (default), attention 'mass', or 'residual' (output error after the output projection, as a share of the layer's attention output: heads weighed by what they contribute)."),
    text: List[Path] = typer.Option([], "--text", help="Calibration text file, a UTF-8 kind of text of its own named by its stem: its first --seq-len tokens are scored, the rest verifies --max-loss (repeatable; default: every shipped kind, see --kinds)."),
    kinds: Optional[str] = typer.Option(
        None, "--kinds", help="Comma-separated shipped kinds of text to calibrate on (prose, code, docs, dialogue, structured): each kind's calibration part is scored and its held-out part verifies --max-loss; with --text files too. Several kinds: one allocation robust over them (--robust), the loss bound held on each kind. Default without --text: all five."
    ),
    robust: str = typer.Option("worst", "--robust", help="With several kinds of text: allocate on each head's 'worst' utility over the kinds (default) or their 'mean'."),
    verify: str = typer.Option("auto", "--verify", help="With several kinds of text and --max-loss: measure each kind's held-out text under a recipe allocated without that kind and under the recipe written ('unseen-kind': the bound then holds on kinds calibration never read too, at some sparsity; up to twice the measurements), or under the recipe allocated on every kind ('held-out'). 'auto' (default): unseen-kind with several kinds, held-out with one."),
    rows: int = typer.Option(256, "--rows", help="Query rows sampled for scoring."),
    baseline_output: Optional[Path] = typer.Option(None, "--baseline-output", help="Also write the uniform-budget recipe of equal sparsity here."),
    kv_budget: Optional[float] = typer.Option(
        None, "--kv-budget", help="Also calibrate decode: fraction of the prompt's KV cache to keep, averaged over KV heads (window / SnapKV / full per head). Default: KV plans follow the prefill plans."
    ),
    decode_pages: int = typer.Option(0, "--decode-pages", help="With --kv-budget: heads kept in full or by SnapKV read only this many Quest-selected 16-token pages per decode step (0: all)."),
    decode_recall: Optional[float] = typer.Option(
        None, "--decode-recall", help="With --kv-budget: each head kept in full reads the fewest Quest-selected pages that keep this share of the attention (e.g. 0.95), measured in the same pass."
    ),
    retrieval_weight: float = typer.Option(
        0.0, "--retrieval-weight", help="Share of each head's score from rows that copy a passage from far back (the text ends on a repeat), so retrieving heads are not given a window (0.25 helped needle retrieval in prose on SmolLM2 at 8K, at some perplexity); 0: prose rows only."
    ),
    dense_prefix_tokens: int = typer.Option(0, "--dense-prefix-tokens", help="The first N tokens' query rows read every causal block (cheap: (N / seq-len)^2 of the blocks; token budgets otherwise starve them). Calibration counts it in the sparsity."),
    probes: Optional[int] = typer.Option(
        None, "--probes", help="Needle prompts (the calibration text with a hidden number and a question about it) that measure each layer's cost to the answer and to the text's likelihood; the allocation is then weighed by both. Costs a forward per layer per probe. Default: 4 on a GPU, 0 on a CPU (minutes per layer at 8K)."
    ),
    needles: Optional[int] = typer.Option(
        None, "--needles", help="Needle prompts (the first text with a hidden number at least half the prompt back and a question about it), each run once: a head whose answer rows read the needle is not given a streaming window that cuts it off. Default: 2 (none where the text is too short for one). 0: none."
    ),
    layer_strategies: List[str] = typer.Option([], "--layer-strategies", help="FIRST-LAST=STRATEGY,STRATEGY (repeatable): those layers choose among these of --strategies only, under the budget --layer-budgets says (e.g. 5-29=dense,streaming,block_topk)."),
    layer_budgets: str = typer.Option("kept", "--layer-budgets", help="With --layer-strategies: 'kept' gives each rule's layers the density the allocation without rules gives them, to choose among their strategies within it (the other layers keep the unrestricted plans); 'shared' spends one budget over every head, so a restricted range can draw density from the rest."),
    break_even: bool = typer.Option(True, "--break-even/--no-break-even", help="On a GPU, time each layer's sparse prefill against dense attention at the calibration length, its half and its quarter, and prefill a layer densely below the length where its sparse path stops losing (written into the recipe per layer). Nothing is timed on a CPU."),
    min_sparse_tokens: int = typer.Option(0, "--min-sparse-tokens", help="Prompts shorter than this prefill densely (written into the recipe): where building layouts costs more than the attention it skips, e.g. small models on a GPU. 0: every prompt sparse."),
    heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="PNG heat map of chosen densities (default: beside the recipe)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    seed: int = typer.Option(0, "--seed"),
    debug: bool = DEBUG_OPTION,
):
    """Measure every strategy's kept attention per head in one forward pass and write a recipe."""

    def body():
        from ..calibrate.options import CalibrationOptions
        from ..calibrate.search import DEFAULT_MAX_LOSS
        from ..models import load_model

        options = CalibrationOptions(
            target_sparsity=target_sparsity, max_loss=max_loss if max_loss is not None or target_sparsity is not None else DEFAULT_MAX_LOSS,
            seq_len=seq_len, block_size=block_size, strategies=_comma_list(strategies), objective=objective, n_rows=rows,
            kv_budget=kv_budget, decode_pages=decode_pages, decode_recall=decode_recall, retrieval_weight=retrieval_weight,
            dense_prefix_tokens=dense_prefix_tokens, probes=probes, needles=needles, min_sparse_tokens=min_sparse_tokens, seed=seed,
            texts=tuple(text), kinds=None if kinds is None else _comma_list(kinds), robust=robust, break_even=break_even,
            verify=verify, layer_strategies=tuple(layer_strategies), layer_budgets=layer_budgets,
        )
        heat = heatmap or output.with_suffix(".png")
        _check_outputs({"--output": output, "--heatmap": heat, "--baseline-output": baseline_output})
        texts = _calibration_texts(options)
        if options.verify == "unseen-kind" and len(texts) < 2:
            raise PatchattnError("--verify unseen-kind measures each kind of text under a recipe allocated on the others: "
                                 "calibrate on two kinds or more (--kinds prose,code, or several --text files)")
        with console.status("loading model"):
            lm, tokenizer = load_model(model, dtype=dtype, device=device, device_map=device_map)
        recipe = _calibrate_with_progress(lm, tokenizer, texts, options)
        _save(recipe, output, heat, baseline_output)

    _run(body)


def _check_outputs(outputs: dict) -> None:
    """Every file to write (by its flag; None: not asked for) writable, and no two of them the same file."""
    from ..io import check_file_path

    for flag, path in outputs.items():
        if path is not None:
            check_file_path(path, flag)
    named = [p.resolve() for p in outputs.values() if p is not None]
    if len(set(named)) < len(named):
        raise PatchattnError("--output, --heatmap and --baseline-output must be different files")


def _calibration_texts(options) -> list:
    """The texts to calibrate on: --text files and --kinds; with neither, every shipped kind (prose first: the probes'
    and the KV plans' text)."""
    from ..calibrate.texts import calibration_texts
    from ..text import KINDS

    if not options.texts and options.kinds is None:
        return calibration_texts((), list(KINDS))
    return calibration_texts(options.texts, options.kinds)


def _needle_probes(lm, tokenizer, first_ids, options) -> tuple:
    """The layer probes on the first text: --probes of them, by default 4 on a GPU and none on a CPU."""
    from ..calibrate import needle_probes

    on_gpu = next(lm.parameters()).device.type == "cuda"
    n_probes = options.probes if options.probes is not None else (4 if on_gpu else 0)
    if options.probes is None and not on_gpu:
        console.print("[dim]no layer probes on a CPU by default (a forward per layer per probe); --probes N asks for them[/]")
    return needle_probes(tokenizer, first_ids, n_probes, options.seed) if n_probes else ()


DEFAULT_NEEDLES = 2


def _retrieval_needles(tokenizer, first_ids, options) -> tuple:
    """The needle check's --needles prompts on the first text, each needle at least half the prompt back (none
    when no windowed strategy is among the candidates)."""
    from ..calibrate import needle_probes
    from ..calibrate.retrieval import NEEDLE_DEPTHS
    from ..strategies import STRATEGIES

    count = DEFAULT_NEEDLES if options.needles is None else options.needles
    if not count or not any(STRATEGIES[name].windowed for name in options.strategies):
        return ()
    try:
        return tuple(needle_probes(tokenizer, first_ids, count, options.seed + 1, depths=NEEDLE_DEPTHS))
    except OptionError:
        n = first_ids.shape[1]
        if options.needles is None:
            console.print(f"[dim]no needle check: {n} tokens leave no room for a needle and its question[/]")
            return ()
        raise OptionError("seq_len", f"{n} is too short for the needle check; raise it or pass --needles 0") from None


def _calibrate_with_progress(lm, tokenizer, texts: list, options):
    """The calibration of ``options`` on ``texts`` and the loaded model; its layers, probes and loss-bound search as
    progress bars."""
    from ..calibrate import calibrate as run_calibration
    from ..calibrate.texts import tokenize_texts
    from ..hf import num_layers
    from ..models import context_length

    input_ids, held_out, text_name = tokenize_texts(tokenizer, texts, options.seq_len, context_length(lm.config))
    first_ids = next(iter(input_ids.values())) if isinstance(input_ids, dict) else input_ids  # the probes' text
    n_layers = num_layers(lm.config)
    probe_set = _needle_probes(lm, tokenizer, first_ids, options)
    needle_set = _retrieval_needles(tokenizer, first_ids, options)
    with _progress() as progress:
        of_kinds = f" of {len(texts)} kinds of text" if isinstance(input_ids, dict) else ""
        task = progress.add_task(f"calibrating {options.seq_len} tokens{of_kinds}", total=n_layers * len(texts))
        probe_task = progress.add_task(f"probing layers ({len(probe_set)} needle prompts)", total=n_layers, visible=bool(probe_set))
        search_task = progress.add_task(f"searching for {options.max_loss}", total=None, visible=options.max_loss is not None)
        progress.add_task("then the recipe measured on each kind's held-out text", total=None,
                          visible=options.max_loss is None and isinstance(input_ids, dict) and len(input_ids) > 1)

        def on_search(step) -> None:
            progress.update(search_task, advance=1, description=(
                f"searching for {options.max_loss}: target {step.target:.3f} gave {100 * step.loss:+.2f}%"))
        recipe = run_calibration(
            lm,
            input_ids,
            target_sparsity=options.target_sparsity,
            max_loss=options.max_loss,
            held_out=held_out,
            on_search=on_search,
            min_sparse_tokens=options.min_sparse_tokens,
            block_size=options.block_size,
            strategies=list(options.strategies),
            n_rows=options.n_rows,
            seed=options.seed,
            text_name=text_name,
            objective=options.objective,
            on_layer=lambda layer, scores: progress.advance(task),
            kv_budget=options.kv_budget,
            decode_pages=options.decode_pages,
            decode_recall=options.decode_recall,
            retrieval_weight=options.retrieval_weight,
            dense_prefix_tokens=options.dense_prefix_tokens,
            probes=probe_set,
            needles=needle_set,
            on_probe=lambda layer: progress.advance(probe_task),
            robust=options.robust,
            verify=options.verify,
            layer_strategies=options.layer_strategies,
            layer_budgets=options.layer_budgets,
        )
    _fit_break_even(lm, recipe, first_ids, options)
    return recipe


def _fit_break_even(lm, recipe, first_ids, options) -> None:
    """On a GPU (and unless --no-break-even): each layer's prefill break-even, timed on the first text."""
    from ..calibrate.breakeven import break_even_lengths, fit_break_even

    on_gpu = next(lm.parameters()).device.type == "cuda"
    if not options.break_even or not on_gpu:
        if options.break_even:
            console.print("[dim]no prefill break-even timed on a CPU (a patched model prefills densely there by default)[/]")
        return
    lengths = break_even_lengths(first_ids.shape[1])
    if not lengths or all(h.strategy == "dense" for layer in recipe.layers for h in layer):
        return
    with console.status(f"timing each layer's prefill, sparse against dense, at {', '.join(map(str, lengths))} tokens"):
        recipe.calibration["break_even"] = fit_break_even(lm, recipe, first_ids.to(lm.device), lengths)


def _save(recipe, output: Path, heat: Path, baseline_output: Optional[Path]) -> None:
    """Write the recipe and its heat map (and the uniform baseline when asked for) and print what was written."""
    from ..calibrate import uniform_baseline
    from ..calibrate.plot import save_density_heatmap

    recipe.name = output.stem
    recipe.save(output)
    save_density_heatmap(recipe, heat)
    _print_recipe(recipe)
    console.print(f"recipe written to [bold]{output}[/], heat map to [bold]{heat}[/]")
    if baseline_output is not None:
        baseline = uniform_baseline(recipe)
        baseline.name = baseline_output.stem
        baseline.save(baseline_output)
        head = next((h for layer in baseline.layers for h in layer if h.strategy != "dense"), baseline.layers[0][0])
        console.print(f"uniform baseline ({head.strategy} {head.params}, sparsity {baseline.calibration['achieved_sparsity']:.3f}) written to [bold]{baseline_output}[/]")
