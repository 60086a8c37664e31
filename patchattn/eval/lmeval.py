"""lm-eval on the patched model: any lm-eval task through lm-eval's ``HFLM`` wrapper, dense and per recipe, and
patchattn's own long-context tasks shipped as lm-eval task definitions over local JSONL data.

patchattn's tasks (``patchattn_passkey``, ``patchattn_single``, ... and the tag ``patchattn`` for all of them)
depend on the tokenizer and the length, since the haystacks are sized in tokens. ``write_task_dir`` writes,
for one tokenizer and length, the same seeded prompts patchattn's own eval uses (``runner.task_prompts``) as
JSONL, beside the task YAMLs and the lm-eval glue from ``lm_eval_tasks/``, and patchattn's scoring code
(scoring.py). That directory runs offline with plain lm-eval::

    lm_eval --model hf --model_args pretrained=MODEL --include_path DIR --tasks patchattn

Rows come back in the runner's row format, with ``task`` set to ``"lmeval:" + the lm-eval task name``
(the report lists them in its lm-eval table) and the metric as lm-eval names it (``acc``; ``acc (filter)``
for a filter other than ``none``), ``stderr`` beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import PatchattnError
from ..models import context_length
from ..patch import patched, quality_backend
from ..recipe import Recipe
from ..stats import record_sparsity
from .haystack import BUILDERS, uses_chat_template
from .runner import task_prompts

logger = logging.getLogger(__name__)

TASK_PREFIX = "patchattn_"
TAG = "patchattn"  # lm-eval tag naming every patchattn task
NEEDLE_TASKS = tuple(BUILDERS)  # passkey, single, multikey, multivalue, multiquery, vartrack
ROW_PREFIX = "lmeval:"
TEMPLATE_DIR = Path(__file__).with_name("lm_eval_tasks")
GLUE_FILES = ("_template_yaml", "patchattn_tasks.py")
SCORING_FILE = "patchattn_scoring.py"  # a copy of scoring.py
RESERVED_OPTIONS = ("model", "model_args", "tasks", "task_manager", "pretrained", "tokenizer", "device")
Progress = Callable[[int, str], None]


class LmEvalMissingError(PatchattnError):
    """lm-eval is not installed."""


class UnknownLmEvalTaskError(PatchattnError):
    """A task name lm-eval does not know."""


def require_lm_eval() -> str:
    """lm-eval's version; LmEvalMissingError (saying how to install it) when it is not installed."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (its torch/transformers side must import too)
    except ImportError as exc:
        raise LmEvalMissingError(f"lm-eval is not installed ({exc}); install it with: pip install 'patchattn[lmeval]'") from None
    from importlib.metadata import version

    return getattr(lm_eval, "__version__", None) or version("lm_eval")


# ---- patchattn's tasks as lm-eval task directories ---------------------------------------------------
def lm_eval_name(task: str) -> str:
    """The lm-eval task name of a patchattn needle task (``passkey`` -> ``patchattn_passkey``)."""
    return TASK_PREFIX + task


def write_task_dir(
    tokenizer, length_tokens: int, out_dir: str | Path, *, tasks: Sequence[str] = NEEDLE_TASKS, trials: int = 5, seed: int = 0,
    context_tokens: int | None = None,
) -> Path:
    """Write patchattn's ``tasks`` at ``length_tokens`` as an lm-eval task directory (for ``--include_path``):
    one ``patchattn_<task>.yaml`` and ``.jsonl`` each, holding exactly the prompts of patchattn's own eval with
    the same ``trials`` and ``seed`` (shortened as it does to fit ``context_tokens``, the model's context)."""
    unknown = [t for t in tasks if t not in NEEDLE_TASKS]
    if unknown:
        raise ValueError(f"unknown patchattn task(s) {', '.join(unknown)}; choose from {', '.join(NEEDLE_TASKS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in GLUE_FILES:
        shutil.copyfile(TEMPLATE_DIR / name, out_dir / name)
    shutil.copyfile(Path(__file__).with_name("scoring.py"), out_dir / SCORING_FILE)
    source = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    model_args = "".join(f",{k}={v}" for k, v in prompt_model_args(tokenizer).items())
    for task in tasks:
        name = lm_eval_name(task)
        lines = []
        for trial, prompt in enumerate(task_prompts(task, tokenizer, length_tokens, context_tokens, trials, seed)):
            doc = {
                "input": prompt.text, "target": ", ".join(prompt.answers), "answers": list(prompt.answers),
                "match": prompt.match, "max_new_tokens": prompt.max_new_tokens, "prompt_tokens": prompt.length_tokens,
                "length_tokens": length_tokens, "seed": seed * 10_000 + trial, "depths": list(prompt.depths), "tokenizer": source,
            }
            lines.append(json.dumps(doc, ensure_ascii=False))
        (out_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (out_dir / f"{name}.yaml").write_text(
            f"# patchattn {task} at {length_tokens} tokens: {trials} seeded prompts (seed {seed}) for tokenizer {source}\n"
            f"# lm_eval --model hf --model_args pretrained=MODEL{model_args} --include_path DIR --tasks {name}\n"
            f"include: _template_yaml\ntask: {name}\ndataset_kwargs:\n  data_file: {name}.jsonl\n",
            encoding="utf-8",
        )
    return out_dir


def prompt_model_args(tokenizer) -> dict:
    """HFLM options that make lm-eval tokenise patchattn's prompts as patchattn does: a prompt rendered with
    the chat template already holds whatever special tokens the template gives, so none is added."""
    return {"add_bos_token": False} if uses_chat_template(tokenizer) else {}


# ---- options and task names ---------------------------------------------------------------------------
def parse_options(text: str | None) -> dict:
    """lm-eval options from the command line: a JSON object, or ``key=value`` pairs separated by commas
    (values read as JSON where they parse: numbers, true/false, null; else as strings)."""
    if not text or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            options = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PatchattnError(f"--lm-eval-args is not valid JSON: {exc}") from None
        if not isinstance(options, dict):
            raise PatchattnError("--lm-eval-args must be a JSON object or key=value pairs")
        return options
    options = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PatchattnError(f"--lm-eval-args: expected key=value, got {pair!r} (use a JSON object for values with commas)")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return options


def split_options(options: Mapping) -> tuple[dict, dict]:
    """(HFLM keyword arguments, ``simple_evaluate`` keyword arguments) from the user's lm-eval options."""
    import inspect

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model_keys = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
    evaluate_keys = set(inspect.signature(simple_evaluate).parameters)
    model_kwargs, evaluate_kwargs = {}, {}
    for key, value in options.items():
        if key in RESERVED_OPTIONS:
            raise PatchattnError(f"--lm-eval-args: {key!r} is set by patchattn (the loaded, patched model and the task list)")
        if key in ("batch_size", "max_batch_size") or key in model_keys and key not in evaluate_keys:
            model_kwargs[key] = value
        elif key in evaluate_keys:
            evaluate_kwargs[key] = value
        else:
            known = sorted((model_keys | evaluate_keys) - set(RESERVED_OPTIONS))
            raise PatchattnError(f"--lm-eval-args: unknown option {key!r}; lm-eval takes {', '.join(known)}")
    return model_kwargs, evaluate_kwargs


def split_task_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(patchattn needle tasks, other lm-eval task names); the tag ``patchattn`` stands for every needle task."""
    ours, others = [], []
    for name in names:
        if name == TAG:
            ours += [t for t in NEEDLE_TASKS if t not in ours]
        elif name.startswith(TASK_PREFIX) and name[len(TASK_PREFIX):] in NEEDLE_TASKS:
            ours += [] if name[len(TASK_PREFIX):] in ours else [name[len(TASK_PREFIX):]]
        elif name.startswith(TASK_PREFIX):
            raise UnknownLmEvalTaskError(
                f"unknown patchattn lm-eval task {name!r}; patchattn's are {', '.join(map(lm_eval_name, NEEDLE_TASKS))} (or {TAG!r} for all)"
            )
        elif name not in others:
            others.append(name)
    return ours, others


def check_tasks(names: Sequence[str]):
    """Check every name before any model work; returns lm-eval's TaskManager for the non-patchattn names
    (None when there are none). UnknownLmEvalTaskError names the tasks lm-eval does not know."""
    require_lm_eval()
    _, others = split_task_names(names)
    if not others:
        return None
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    known = set(manager.all_tasks)
    unknown = [n for n in others if n not in known]
    if unknown:
        raise UnknownLmEvalTaskError(
            f"lm-eval does not know the task(s) {', '.join(unknown)}; `lm-eval ls tasks` lists them, "
            f"patchattn's are {', '.join(map(lm_eval_name, NEEDLE_TASKS))}"
        )
    return manager


def lm_eval_steps(variants: Mapping, lengths: Sequence[int], names: Sequence[str]) -> int:
    """How many progress steps ``run_lm_eval`` reports in all: one per variant, task and (for patchattn's
    tasks) length."""
    ours, others = split_task_names(names)
    return len(variants) * (len(ours) * len(set(lengths)) + len(others))


# ---- running ------------------------------------------------------------------------------------------
def run_lm_eval(
    model,
    tokenizer,
    variants: Mapping[str, Recipe | None],
    task_names: Sequence[str],
    lengths: Sequence[int] = (),
    *,
    work_dir: str | Path,
    trials: int = 5,
    seed: int = 0,
    options: Mapping | None = None,
    backend: str = "auto",
    task_manager=None,
    progress: Progress | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run lm-eval ``task_names`` on ``model`` for each variant (a Recipe, or None for dense), one
    ``simple_evaluate`` per variant, task and (patchattn's tasks) length; returns result rows.

    patchattn's tasks are written under ``work_dir/<length>/`` (see ``write_task_dir``) from the same
    ``trials`` and ``seed`` as patchattn's own eval. ``options`` are lm-eval's own (``limit``,
    ``num_fewshot``, ``gen_kwargs``, ``batch_size``, ...). ``task_manager``: one from ``check_tasks``, reused
    for the other tasks. ``progress(advance, description)`` as in ``run_eval``; ``on_row(row)`` after each row."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model_kwargs, evaluate_kwargs = split_options(options or {})
    evaluate_kwargs.setdefault("verbosity", "ERROR")
    evaluate_kwargs.setdefault("log_samples", True)
    ours, others = split_task_names(task_names)
    if others and task_manager is None:
        task_manager = check_tasks(others)
    model_kwargs.setdefault("batch_size", 1)
    runs = []  # (length or None, lm-eval task name, its TaskManager, the HFLM to run it with)
    if ours:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, **{**prompt_model_args(tokenizer), **model_kwargs})
        for length in sorted(set(int(n) for n in lengths)):
            task_dir = write_task_dir(tokenizer, length, Path(work_dir) / str(length), tasks=ours, trials=trials, seed=seed,
                                      context_tokens=context_length(model.config))
            manager = TaskManager(include_path=str(task_dir), include_defaults=False)
            runs += [(length, lm_eval_name(task), manager, lm) for task in ours]
    if others:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, **model_kwargs)
        runs += [(None, name, task_manager, lm) for name in others]
    report = progress or (lambda advance, description: None)
    rows: list[dict] = []
    for length, name, manager, lm in runs:
        for variant, recipe in variants.items():
            description = f"lm-eval {name}" + (f" · {length} tokens" if length else "") + f" · {variant}"
            report(0, description)
            started = time.perf_counter()
            with patched(model, recipe, quality_backend(backend)), record_sparsity() as record:
                output = simple_evaluate(model=lm, tasks=[name], task_manager=manager, **evaluate_kwargs)
            sparsity = 0.0 if recipe is None else record.sparsity
            for row in _rows(output, variant, length, sparsity, round(time.perf_counter() - started, 3)):
                logger.info("%s: %s %s %.4g", description, row["task"], row["metric"], row["value"])
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            report(1, description)
    return rows


def _rows(output: dict | None, variant: str, length: int | None, sparsity: float | None, seconds: float) -> list[dict]:
    """One row per task and metric of a ``simple_evaluate`` output (standard errors beside their metric)."""
    if not output:  # lm-eval returns None on ranks other than 0
        return []
    rows = []
    for task, metrics in output["results"].items():
        samples = sorted(output.get("samples", {}).get(task, []), key=lambda s: s["doc_id"])
        n_samples = (output.get("n-samples", {}).get(task) or {}).get("effective", len(samples) or None)
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or metric.endswith("_stderr") or not filter_name:
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            per_sample = [s[metric] for s in samples if s.get("filter") in (None, filter_name) and isinstance(s.get(metric), (int, float))]
            rows.append({
                "length": length,
                "task": ROW_PREFIX + task,
                "variant": variant,
                "metric": metric if filter_name == "none" else f"{metric} ({filter_name})",
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "sparsity": None if sparsity is None else float(sparsity),
                "trials": n_samples,
                "scores": per_sample,
                "replies": [_reply(s) for s in samples] if task.startswith(TASK_PREFIX) else [],
                "prompt_tokens": [s["doc"].get("prompt_tokens") for s in samples if isinstance(s.get("doc"), dict)],
                "seconds": seconds,
                "kv_bytes": None,
            })
    return rows


def _reply(sample: dict) -> str:
    filtered = sample.get("filtered_resps") or sample.get("resps") or [""]
    first = filtered[0]
    return first[0] if isinstance(first, list) else str(first)
