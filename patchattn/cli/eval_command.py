"""``patchattn eval``: its options, checked before the model loads; then dense against every recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import typer

from .app import DEBUG_OPTION, DEVICE_MAP_HELP, MODEL_HELP, _comma_list, _run, app, console
from .eval_recipes import DEFAULT_EVAL_LENGTHS, _add_exported, _load_recipes, _parse_lengths, _variants, _verified_lengths
from .eval_run import _evaluate_with_progress, _print_report


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
    backend: str = typer.Option("auto", "--backend", help="Sparse kernels: auto (the GPU kernels; where they cannot run, as on a CPU, the speed runs prefill densely, said once, while the quality tasks still run the recipe's layouts), sparse (the layouts everywhere, the PyTorch reference where no kernel runs), torch or triton."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Replay each layer's short-prompt prefill attention as a CUDA graph (captured once per prompt shape; pays where lengths recur, as in the speed runs). Also PATCHATTN_CUDA_GRAPHS=1."),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("auto", "--device"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    seed: int = typer.Option(0, "--seed"),
    lm_eval_tasks: str = typer.Option(
        "", "--lm-eval-tasks", help="Comma-separated lm-eval tasks, run dense and patched through lm-eval's HFLM: any installed task, or patchattn's own (patchattn_passkey, patchattn_single, patchattn_multikey, patchattn_multivalue, patchattn_multiquery, patchattn_vartrack; 'patchattn' for all) at --lengths with --trials and --seed."
    ),
    lm_eval_args: str = typer.Option("", "--lm-eval-args", help="lm-eval's own options as key=value pairs separated by commas (limit=5,num_fewshot=0,batch_size=1) or a JSON object (for values with commas, e.g. gen_kwargs)."),
    debug: bool = DEBUG_OPTION,
):
    """Dense vs patched on the same prompts: perplexity, passkey and needle accuracy, achieved sparsity."""

    def body():
        from ..eval.options import EvalOptions
        from ..eval.ppl_texts import load_ppl_texts
        from ..eval.runner import check_lengths
        from ..io import check_dir_path
        from ..models import load_model

        options = EvalOptions(
            lengths=tuple(_parse_lengths(lengths) if lengths is not None else DEFAULT_EVAL_LENGTHS), tasks=_comma_list(tasks), trials=trials,
            ppl_windows=ppl_windows, speed_runs=speed_runs, backend=backend, baseline=baseline, seed=seed, ppl_texts=tuple(ppl_text),
        )
        check_dir_path(output, "--output")
        lm_eval_names, lm_eval_options, task_manager = _lm_eval_plan(lm_eval_tasks, lm_eval_args)
        recipes = _load_recipes(recipe, model)
        if lengths is None:  # every option checked first; then the recipes say where they were verified
            options = dataclasses.replace(options, lengths=tuple(_verified_lengths(recipes, model)))
        with console.status("loading model"):
            lm, tokenizer = load_model(model, dtype=dtype, device=device, device_map=device_map)
        _add_exported(lm, model, recipes)
        check_lengths(lm, list(options.lengths))
        texts = load_ppl_texts(tokenizer, options.ppl_texts, list(options.lengths)) if options.ppl_texts else []
        variants = _variants(recipes, baseline)
        results = _evaluate_with_progress(lm, tokenizer, variants, options, texts, output, cuda_graphs, lm_eval_names, lm_eval_options, task_manager)
        _print_report(results, output, lm_eval_names, tokenizer)

    _run(body)


def _lm_eval_plan(lm_eval_tasks: str, lm_eval_args: str) -> tuple[list[str], dict, object]:
    """--lm-eval-tasks and --lm-eval-args checked before the model loads (lm-eval installed, its task names and
    options known): the task names, lm-eval's options, and its task manager (None without tasks)."""
    from ..eval import lmeval

    lm_eval_names = list(_comma_list(lm_eval_tasks))
    lm_eval_options = lmeval.parse_options(lm_eval_args)
    task_manager = None
    if lm_eval_names:
        task_manager = lmeval.check_tasks(lm_eval_names)
        lmeval.split_options(lm_eval_options)
    return lm_eval_names, lm_eval_options, task_manager
