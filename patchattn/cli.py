"""The ``patchattn`` command: calibrate, eval, export. Parses, calls the library, renders with Rich."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import OptionError, PatchattnError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training-free sparse attention for long-context HuggingFace LMs.")
console = Console(stderr=False)
err_console = Console(stderr=True)
_STATE = {"debug": False}

MODEL_HELP = "HuggingFace id already in the local cache, a local model directory, or a .gguf file (default: the embedded SmolLM2-135M-Instruct)."


def _set_debug(debug: bool) -> bool:
    """--debug, before or after the subcommand: tracebacks and debug logs."""
    if debug:
        _STATE["debug"] = True
        logging.getLogger().setLevel(logging.DEBUG)
        import transformers

        transformers.utils.logging.set_verbosity_warning()
        transformers.utils.logging.enable_progress_bar()
    return debug


DEBUG_OPTION = typer.Option(False, "--debug", help="Show tracebacks and debug logs.", callback=_set_debug)


@app.callback()
def main(
    debug: bool = DEBUG_OPTION,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs."),
):
    _STATE["debug"] = debug  # a --debug after the subcommand sets it again when that is parsed
    from .cleanup import install_signal_handlers

    install_signal_handlers()  # SIGTERM unwinds like Ctrl-C: temporary files go, finished eval rows stay
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)])
    if not debug:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


# Options whose library name differs from the flag's spelling; the others are their flags with "_" for "-".
_FLAGS = {"n_rows": "--rows", "ppl_texts": "--ppl-text", "texts": "--text"}
_OPTION_NAMES = re.compile(r"\b(target_sparsity|max_loss|seq_len|block_size|n_rows|kv_budget|decode_pages|decode_recall|retrieval_weight|"
                           r"dense_prefix_tokens|min_sparse_tokens|ppl_windows|ppl_texts|speed_runs)\b")


def _flag(option: str) -> str:
    return _FLAGS.get(option, "--" + option.replace("_", "-"))


def _message(exc: PatchattnError) -> str:
    """The error's line, the library's option names written as the flags a CLI user typed."""
    text = f"{_flag(exc.option)} {exc.problem}" if isinstance(exc, OptionError) else str(exc)
    return _OPTION_NAMES.sub(lambda m: _flag(m.group(1)), text)


def _run(fn, *args, **kwargs):
    """Call ``fn``; turn errors into one readable line and a non-zero exit code (tracebacks with --debug). A command
    that fails takes back the empty directories it created."""
    from .io import forget_created_dirs, remove_created_dirs

    try:
        result = fn(*args, **kwargs)
        forget_created_dirs()
        return result
    except BaseException as exc:
        remove_created_dirs()
        if _STATE["debug"] or isinstance(exc, (typer.Exit, SystemExit)):
            raise
        if isinstance(exc, PatchattnError):
            err_console.print(f"[bold red]error:[/] {_message(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM / SIGHUP (patchattn.cleanup.Terminated)
            err_console.print(f"[bold red]{exc or 'interrupted'}[/]", highlight=False)
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None
        if not isinstance(exc, Exception):
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(
            f"[bold red]error:[/] unexpected {type(exc).__name__}: {message} (run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


def _parse_lengths(text: str) -> list[int]:
    """--lengths as integers (their range is the eval options' to check)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PatchattnError(f"--lengths must be comma-separated integers, not {text!r}") from None


# ---------------------------------------------------------------------------------------------- calibrate
@app.command()
def calibrate(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    target_sparsity: Optional[float] = typer.Option(None, "--target-sparsity", "-s", help="Fraction of causal query-key blocks to skip, averaged over heads, whatever it costs (instead of --max-loss)."),
    max_loss: Optional[str] = typer.Option(
        None, "--max-loss", help="The quality loss to stay within, e.g. ppl=2%: the sparsest recipe whose perplexity on held-out calibration text rises at most that much, verified with patched forwards at the calibration length and shorter ones (dense below the shortest within the bound). Default when --target-sparsity is not given: ppl=2%."
    ),
    seq_len: int = typer.Option(4096, "--seq-len", "-n", help="Calibration length in tokens."),
    output: Path = typer.Option(Path("recipe.json"), "--output", "-o", help="Recipe JSON to write."),
    block_size: int = typer.Option(64, "--block-size", help="Block size of the layouts (tokens)."),
    strategies: str = typer.Option("dense,streaming,vertical_slash,vertical_slash_tokens,block_topk", "--strategies", help="Comma-separated strategies to choose from."),
    objective: str = typer.Option("output", "--objective", help="What to keep most of: attention 'output' accuracy (default), attention 'mass', or 'residual' (output error after the output projection, as a share of the layer's attention output: heads weighed by what they contribute)."),
    text: List[Path] = typer.Option([], "--text", help="Calibration text file, a UTF-8 kind of text of its own named by its stem: its first --seq-len tokens are scored, the rest verifies --max-loss (repeatable; default: shipped public-domain prose)."),
    kinds: Optional[str] = typer.Option(
        None, "--kinds", help="Comma-separated shipped kinds of text to calibrate on (prose, code, docs, dialogue, structured): each kind's calibration part is scored and its held-out part verifies --max-loss; with --text files too. Several kinds: one allocation robust over them (--robust), the loss bound held on each kind."
    ),
    robust: str = typer.Option("worst", "--robust", help="With several kinds of text: allocate on each head's 'worst' utility over the kinds (default) or their 'mean'."),
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
    min_sparse_tokens: int = typer.Option(0, "--min-sparse-tokens", help="Prompts shorter than this prefill densely (written into the recipe): where building layouts costs more than the attention it skips, e.g. small models on a GPU. 0: every prompt sparse."),
    heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="PNG heat map of chosen densities (default: beside the recipe)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Place the model with accelerate: auto, balanced, balanced_low_0 or sequential (over every visible GPU; default: auto on CUDA)."),
    seed: int = typer.Option(0, "--seed"),
    debug: bool = DEBUG_OPTION,
):
    """Measure every strategy's kept attention per head in one forward pass and write a recipe."""

    def body():
        from .calibrate import calibrate as run_calibration
        from .calibrate import needle_probes, uniform_baseline
        from .calibrate.options import CalibrationOptions
        from .calibrate.plot import save_density_heatmap
        from .hf import text_config
        from .io import check_file_path
        from .models import context_length, load_model
        from .text import load_text

        from .calibrate.search import DEFAULT_MAX_LOSS
        from .calibrate.texts import CalibrationText, calibration_texts, tokenize_texts

        options = CalibrationOptions(
            target_sparsity=target_sparsity, max_loss=max_loss if max_loss is not None or target_sparsity is not None else DEFAULT_MAX_LOSS,
            seq_len=seq_len, block_size=block_size,
            strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()), objective=objective, n_rows=rows,
            kv_budget=kv_budget, decode_pages=decode_pages, decode_recall=decode_recall, retrieval_weight=retrieval_weight,
            dense_prefix_tokens=dense_prefix_tokens, probes=probes, min_sparse_tokens=min_sparse_tokens, seed=seed,
            texts=tuple(text), kinds=None if kinds is None else tuple(k.strip() for k in kinds.split(",") if k.strip()), robust=robust,
        )
        heat = heatmap or output.with_suffix(".png")
        outputs = {"--output": output, "--heatmap": heat, "--baseline-output": baseline_output}
        for flag, path in outputs.items():
            if path is not None:
                check_file_path(path, flag)
        named = [p.resolve() for p in outputs.values() if p is not None]
        if len(set(named)) < len(named):
            raise PatchattnError("--output, --heatmap and --baseline-output must be different files")
        texts = calibration_texts(options.texts, options.kinds) or [
            CalibrationText("prose", "patchattn:calibration (State of the Union 1901-1961)", load_text("calibration"))]
        with console.status("loading model"):
            lm, tokenizer = load_model(model, dtype=dtype, device=device, device_map=device_map)
        input_ids, held_out, text_name = tokenize_texts(tokenizer, texts, seq_len, context_length(lm.config))
        first_ids = next(iter(input_ids.values())) if isinstance(input_ids, dict) else input_ids  # the probes' text
        n_layers = text_config(lm.config).num_hidden_layers
        on_gpu = next(lm.parameters()).device.type == "cuda"
        n_probes = probes if probes is not None else (4 if on_gpu else 0)
        if probes is None and not on_gpu:
            console.print("[dim]no layer probes on a CPU by default (a forward per layer per probe); --probes N asks for them[/]")
        probe_set = needle_probes(tokenizer, first_ids, n_probes, seed) if n_probes else ()
        with _progress() as progress:
            of_kinds = f" of {len(texts)} kinds of text" if isinstance(input_ids, dict) else ""
            task = progress.add_task(f"calibrating {seq_len} tokens{of_kinds}", total=n_layers * len(texts))
            probe_task = progress.add_task(f"probing layers ({n_probes} needle prompts)", total=n_layers, visible=bool(n_probes))
            search_task = progress.add_task(f"searching for {options.max_loss}", total=None, visible=options.max_loss is not None)

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
                on_probe=lambda layer: progress.advance(probe_task),
                robust=options.robust,
            )
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

    _run(body)


# Mean relative error of the heads' attention outputs above which calibrate warns (SmolLM2-135M, 80% sparsity:
# 0.054 at 8K gave +2.8% perplexity, 0.25 at 2K gave +63%; examples/smollm2-8k-token-columns, smollm2-two-gpus).
HIGH_OUTPUT_ERROR = 0.15


def _print_recipe(recipe) -> None:
    probe = recipe.calibration.get("probe")
    caption = ("answer / NLL: what the layer's first-pass plan alone cost the probes (drop of the answer's log-probability, "
               "rise of the text's NLL a token); weight: the layer's utility weight in the second allocation") if probe else None
    table = Table(title=f"recipe {recipe.name}: per-layer choice", show_lines=False, caption=caption)
    rises = probe.get("layer_nll_rise") if probe else None  # recipes probed before the NLL term have none
    probe_cols = (("answer", *(("NLL",) if rises else ()), "weight") if probe else ())
    columns = ("layer", "density", "kept mass", "output err", *probe_cols, "strategies")
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
            f"the model's own window of {windows[str(li)]}" if str(li) in windows else ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        )
    console.print(table)
    cal = recipe.calibration
    console.print(
        f"target sparsity {cal.get('target_sparsity')}, achieved {cal.get('achieved_sparsity')}, "
        f"mean kept mass {cal.get('mean_kept_mass')}, heads {recipe.strategy_counts()}"
    )
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


def _print_search(recipe) -> None:
    """The loss-bound search (each target tried, its measured perplexity rise) and the lengths the recipe was verified
    at, when the recipe was calibrated with --max-loss."""
    cal = recipe.calibration
    if "max_loss" not in cal:
        return
    bound = cal["max_loss"]["ppl"]
    mark = lambda ok: "[green]yes[/]" if ok else "[red]no[/]"  # noqa: E731
    kinds = "kinds" in cal  # the perplexity is the worst kind's; the table says which
    search = Table(title=f"search for perplexity within +{100 * bound:.3g}% (verified on {cal['verified_on']})")
    for col in ("target sparsity", "achieved", "perplexity", *(("worst kind",) if kinds else ()), "within"):
        search.add_column(col, justify="right")
    for step in cal["search"]:
        search.add_row(f"{step['target']:.3f}", f"{step['sparsity']:.3f}", f"{100 * step['ppl_loss']:+.2f}%",
                       *((_worst_kind(step),) if kinds else ()), mark(step["within"]))
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


def _worst_kind(row: dict) -> str:
    """The kind of text whose loss a search step or verified length was measured by (the worst)."""
    by_kind = row.get("ppl_loss_by_kind") or {}
    return max(by_kind, key=by_kind.get) if by_kind else "-"


def _print_kinds(cal: dict) -> None:
    """Per kind of text, when the recipe was calibrated on several: tokens scored, the sparsity the allocation reaches on
    that kind's scores, and (with --max-loss) the recipe's perplexity rise on its held-out text."""
    kinds = cal.get("kinds")
    if not kinds:
        return
    loss = "max_loss" in cal
    table = Table(title=f"per kind of text (allocation robust over kinds: {cal.get('robust')}, at {cal['seq_len']} tokens)")
    for col in ("kind", "text", "scored tokens", "sparsity", *(("perplexity",) if loss else ())):
        table.add_column(col, justify="left" if col in ("kind", "text") else "right")
    for kind, entry in kinds.items():
        table.add_row(kind, entry.get("text", ""), str(entry["scored_tokens"]), f"{entry['achieved_sparsity']:.3f}",
                      *((f"{100 * entry['ppl_loss']:+.2f}%",) if loss else ()))
    console.print(table)


# ---------------------------------------------------------------------------------------------- export
@app.command()
def export(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe JSON from `patchattn calibrate`."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier patchattn export there (anything else is refused)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16 (weights are saved in it)."),
    device: str = typer.Option("cpu", "--device"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Place the model with accelerate: auto, balanced, balanced_low_0 or sequential (over every visible GPU; default: auto on CUDA)."),
    debug: bool = DEBUG_OPTION,
):
    """Write a directory that loads back as the patched model (safetensors, config, recipe, model card)."""

    def body():
        from .export import check_output_dir
        from .export import export as run_export
        from .models import load_model
        from .recipe import Recipe

        plan = Recipe.load(recipe)
        check_output_dir(output, overwrite)
        with console.status("loading model"):
            lm, tokenizer = load_model(model, dtype=dtype, device=device, device_map=device_map)
        plan.check_model(lm.config)
        with console.status(f"writing {output}"):
            run_export(lm, tokenizer, plan, output, overwrite=overwrite)
        console.print(f"patched model written to [bold]{output}[/]; load it with `patchattn.load({str(output)!r})`")

    _run(body)


# ---------------------------------------------------------------------------------------------- eval
@app.command(name="eval")
def evaluate(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " A directory from `patchattn export` brings its own recipe."),
    recipe: List[Path] = typer.Option([], "--recipe", "-r", help="Recipe JSON (repeatable)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="'uniform': add the uniform-budget recipe of equal sparsity for each recipe."),
    lengths: Optional[str] = typer.Option(None, "--lengths", "-l", help="Comma-separated prompt lengths in tokens (default: the lengths the recipes were verified at by `calibrate --max-loss`, else 2048,4096)."),
    tasks: str = typer.Option("ppl,passkey,single,multikey,multivalue,speed", "--tasks", help="Comma-separated tasks: ppl, passkey, single, multikey, multivalue, multiquery, vartrack (variable tracking), speed (time to first token, ms per generated token, peak memory, KV bytes; always run unless --speed-runs 0)."),
    speed_runs: int = typer.Option(3, "--speed-runs", help="Timed runs per speed figure, after a warm-up run (medians are reported); 0 leaves speed out."),
    trials: int = typer.Option(5, "--trials", help="Prompts per task and length."),
    ppl_windows: int = typer.Option(1, "--ppl-windows", help="Perplexity over this many windows of held-out text at each length (seeded starts), reported as the perplexity of all their tokens."),
    ppl_text: List[Path] = typer.Option([], "--ppl-text", help="A UTF-8 text file of your own: perplexity on --ppl-windows windows of it at each length, beside the held-out prose, reported per text (repeatable; not measured at lengths longer than the text)."),
    output: Path = typer.Option(Path("results"), "--output", "-o", help="Directory for results.json, results.md, the PNG plots and report.html."),
    backend: str = typer.Option("auto", "--backend", help="Sparse kernels: auto, torch or triton."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Replay each layer's short-prompt prefill attention as a CUDA graph (captured once per prompt shape; pays where lengths recur, as in the speed runs). Also PATCHATTN_CUDA_GRAPHS=1."),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("auto", "--device"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Place the model with accelerate: auto, balanced, balanced_low_0 or sequential (over every visible GPU; default: auto on CUDA)."),
    seed: int = typer.Option(0, "--seed"),
    lm_eval_tasks: str = typer.Option(
        "", "--lm-eval-tasks", help="Comma-separated lm-eval tasks, run dense and patched through lm-eval's HFLM: any installed task, or patchattn's own (patchattn_passkey, patchattn_single, patchattn_multikey, patchattn_multivalue, patchattn_multiquery, patchattn_vartrack; 'patchattn' for all) at --lengths with --trials and --seed."
    ),
    lm_eval_args: str = typer.Option("", "--lm-eval-args", help="lm-eval's own options as key=value pairs separated by commas (limit=5,num_fewshot=0,batch_size=1) or a JSON object (for values with commas, e.g. gen_kwargs)."),
    debug: bool = DEBUG_OPTION,
):
    """Dense vs patched on the same prompts: perplexity, passkey and needle accuracy, achieved sparsity."""

    def body():
        from .calibrate import uniform_baseline
        from .eval import lmeval
        from .eval.options import EvalOptions
        from .eval.ppl_texts import load_ppl_texts
        from .eval.report import write_report
        from .eval.runner import check_lengths, eval_steps, run_eval
        from .io import check_dir_path
        from .models import load_model
        from .patch import RECIPE_KEY
        from .recipe import Recipe

        options = EvalOptions(
            lengths=tuple(_parse_lengths(lengths) if lengths is not None else DEFAULT_EVAL_LENGTHS), tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), trials=trials,
            ppl_windows=ppl_windows, speed_runs=speed_runs, backend=backend, baseline=baseline, seed=seed, ppl_texts=tuple(ppl_text),
        )
        if lengths is None:  # every option checked first; then the recipes say where they were verified
            options = dataclasses.replace(options, lengths=tuple(_verified_lengths(recipe, model)))
        length_list, task_list = list(options.lengths), options.run_tasks
        check_dir_path(output, "--output")
        lm_eval_names = [t.strip() for t in lm_eval_tasks.split(",") if t.strip()]
        lm_eval_options = lmeval.parse_options(lm_eval_args)
        task_manager = None
        if lm_eval_names:  # lm-eval installed, its task names and options known, before the model loads
            task_manager = lmeval.check_tasks(lm_eval_names)
            lmeval.split_options(lm_eval_options)
        recipes = [Recipe.load(p) for p in recipe]
        for path, r in zip(recipe, recipes):
            r.name = path.stem  # variants are named after their files
        if not recipes and not _bundles_recipe(model):
            raise PatchattnError("nothing to compare: pass --recipe (or evaluate a directory from `patchattn export`)")
        with console.status("loading model"):
            lm, tokenizer = load_model(model, dtype=dtype, device=device, device_map=device_map)
        exported = getattr(lm.config, RECIPE_KEY, None)
        if exported is not None:  # a directory from `patchattn export`: its recipe is a variant, dense the baseline
            bundled = Recipe.from_dict(exported, source=f"recipe in {model}")
            bundled.name = bundled.name or "exported"
            recipes.insert(0, bundled)
            delattr(lm.config, RECIPE_KEY)
        if not recipes:
            raise PatchattnError("nothing to compare: pass --recipe (or evaluate a directory from `patchattn export`)")
        for r in recipes:
            r.check_model(lm.config)
        check_lengths(lm, length_list)
        texts = load_ppl_texts(tokenizer, options.ppl_texts, length_list) if options.ppl_texts else []
        variants: dict = {"dense": None}
        for r in recipes:
            variants[_unique(variants, r.name or "patched")] = r
            if baseline == "uniform":
                variants[_unique(variants, f"{r.name or 'patched'}-uniform")] = uniform_baseline(r)
        with _progress() as progress:
            total = eval_steps(variants, length_list, task_list, trials, ppl_windows, texts) + lmeval.lm_eval_steps(variants, length_list, lm_eval_names)
            task = progress.add_task("evaluating", total=total)

            def on_progress(advance: int, description: str) -> None:
                progress.update(task, advance=advance, description=description)

            saved: list[dict] = []

            def save_partial(partial: dict) -> None:  # every finished row is on disk at once
                write_report(partial, output)
                saved[:] = [partial]

            try:
                results = run_eval(
                    lm, tokenizer, variants, length_list, tasks=task_list, trials=trials, seed=seed, ppl_windows=ppl_windows, ppl_texts=texts,
                    progress=on_progress, backend=backend, on_row=save_partial, speed_runs=max(1, speed_runs),
                    cuda_graphs=True if cuda_graphs else None,
                )
                if lm_eval_names:  # lm-eval's rows join the same results, saved as they come
                    results.update(complete=False, lm_eval={"version": lmeval.require_lm_eval(), "tasks": lm_eval_names, "options": lm_eval_options})

                    def add_row(row: dict) -> None:
                        results["results"].append(row)
                        save_partial(results)

                    lmeval.run_lm_eval(
                        lm, tokenizer, variants, lm_eval_names, length_list, work_dir=output / "lm_eval_tasks", trials=trials,
                        seed=seed, options=lm_eval_options, backend=backend, task_manager=task_manager, progress=on_progress, on_row=add_row,
                    )
                    results["complete"] = True
            except KeyboardInterrupt:
                from .errors import RunInterrupted

                if not saved:
                    raise RunInterrupted("interrupted before the first result; nothing was written") from None
                done = len(saved[0]["results"])
                raise RunInterrupted(
                    f"interrupted: the {done} result row(s) finished so far are in {output}/results.json and results.md"
                ) from None
        paths = write_report(results, output)
        _print_results(results)
        console.print("written: " + ", ".join(str(p) for p in paths.values()), soft_wrap=True)
        if lmeval.split_task_names(lm_eval_names)[0]:
            model_args = "".join(f",{k}={v}" for k, v in lmeval.prompt_model_args(tokenizer).items())
            console.print(f"patchattn's lm-eval tasks, per length, are in {output / 'lm_eval_tasks'}; on the dense model: "
                          f"`lm_eval --model hf --model_args pretrained=MODEL{model_args} --include_path {output / 'lm_eval_tasks'}/LENGTH --tasks patchattn`", soft_wrap=True)

    _run(body)


# eval's lengths when neither --lengths nor a recipe's verified lengths say
DEFAULT_EVAL_LENGTHS = (2048, 4096)


def _verified_lengths(recipe_paths: list[Path], model: str | None) -> list[int]:
    """The lengths the recipes (and an exported directory's own) were verified at and run sparse, else the defaults."""
    import json

    from .compiled import RECIPE_KEY
    from .recipe import Recipe

    recipes = [Recipe.load(p) for p in recipe_paths]
    if _bundles_recipe(model):
        recipes.append(Recipe.from_dict(json.loads((Path(model) / "config.json").read_text())[RECIPE_KEY], source=f"recipe in {model}"))
    verified = sorted({n for r in recipes for n in r.verified_lengths()})
    if verified:
        console.print(f"[dim]lengths {', '.join(map(str, verified))}: where the recipes were verified (--lengths to choose)[/]")
    return verified or list(DEFAULT_EVAL_LENGTHS)


def _bundles_recipe(model: str | None) -> bool:
    """Whether MODEL is a directory from `patchattn export` (its config carries a recipe), read without loading it."""
    import json

    from .compiled import RECIPE_KEY

    config = Path(model) / "config.json" if model else None
    try:
        return config is not None and config.is_file() and RECIPE_KEY in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def _unique(existing: dict, name: str) -> str:
    out, i = name, 2
    while out in existing:
        out, i = f"{name}-{i}", i + 1
    return out


def _print_results(results: dict) -> None:
    """The report's tables (eval/tables.py) as Rich tables."""
    from rich.text import Text

    from .eval.tables import all_tables, derived_label

    for report_table in all_tables(results):
        table = Table(title=report_table.title, caption=report_table.note or None, caption_justify="left")
        for i, column in enumerate(report_table.columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in report_table.rows:
            label = derived_label(row[0])
            first = Text(row[0]) if label is None else Text(label, style="dim italic")
            table.add_row(first, *[Text(cell) for cell in row[1:]])
        console.print(table)


def run() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
