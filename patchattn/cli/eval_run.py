"""``patchattn eval``'s run: every variant, length and task (and lm-eval's tasks) under one progress bar, each
finished row saved at once, then the report's tables printed."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .app import _progress, console


def _evaluate_with_progress(lm, tokenizer, variants: dict, options, texts: list, output: Path, cuda_graphs: bool,
                            lm_eval_names: list[str], lm_eval_options: dict, task_manager) -> dict:
    """Run ``options`` (an EvalOptions) on every variant, writing the report after each row; a Ctrl-C keeps the rows
    finished so far and says where they are."""
    from ..errors import RunInterrupted
    from ..eval import lmeval
    from ..eval.report import write_report
    from ..eval.runner import eval_steps, run_eval

    length_list, task_list = list(options.lengths), options.run_tasks
    trials, seed, backend = options.trials, options.seed, options.backend
    with _progress() as progress:
        total = eval_steps(variants, length_list, task_list, trials, options.ppl_windows, texts) + lmeval.lm_eval_steps(variants, length_list, lm_eval_names)
        task = progress.add_task("evaluating", total=total)

        def on_progress(advance: int, description: str) -> None:
            progress.update(task, advance=advance, description=description)

        saved: list[dict] = []

        def save_partial(partial: dict) -> None:  # every finished row is on disk at once
            write_report(partial, output)
            saved[:] = [partial]

        try:
            results = run_eval(
                lm, tokenizer, variants, length_list, tasks=task_list, trials=trials, seed=seed, ppl_windows=options.ppl_windows, ppl_texts=texts,
                progress=on_progress, backend=backend, on_row=save_partial, speed_runs=max(1, options.speed_runs),
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
            if not saved:
                raise RunInterrupted("interrupted before the first result; nothing was written") from None
            done = len(saved[0]["results"])
            raise RunInterrupted(
                f"interrupted: the {done} result row(s) finished so far are in {output}/results.json and results.md"
            ) from None
    return results


def _print_report(results: dict, output: Path, lm_eval_names: list[str], tokenizer) -> None:
    """Write the final report, print its tables and where it is (and how to run patchattn's lm-eval tasks densely)."""
    from ..eval import lmeval
    from ..eval.report import write_report

    paths = write_report(results, output)
    _print_results(results)
    console.print("written: " + ", ".join(str(p) for p in paths.values()), soft_wrap=True)
    if lmeval.split_task_names(lm_eval_names)[0]:
        model_args = "".join(f",{k}={v}" for k, v in lmeval.prompt_model_args(tokenizer).items())
        console.print(f"patchattn's lm-eval tasks, per length, are in {output / 'lm_eval_tasks'}; on the dense model: "
                      f"`lm_eval --model hf --model_args pretrained=MODEL{model_args} --include_path {output / 'lm_eval_tasks'}/LENGTH --tasks patchattn`", soft_wrap=True)


def _print_results(results: dict) -> None:
    """The report's tables (eval/tables.py) as Rich tables."""
    from rich.text import Text

    from ..eval.tables import all_tables, derived_label

    for report_table in all_tables(results):
        table = Table(title=report_table.title, caption=report_table.note or None, caption_justify="left")
        for i, column in enumerate(report_table.columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in report_table.rows:
            label = derived_label(row[0])
            first = Text(row[0]) if label is None else Text(label, style="dim italic")
            table.add_row(first, *[Text(cell) for cell in row[1:]])
        console.print(table)
