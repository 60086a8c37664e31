"""lm-eval glue for patchattn's long-context tasks (copied beside the task YAMLs and their JSONL data).

Each JSONL line is one prompt made by patchattn's seeded haystack generator for one tokenizer and length:
``input`` (the full prompt text), ``answers``, ``match`` and ``max_new_tokens``. A reply is greedy-decoded
for exactly ``max_new_tokens`` tokens (or to the end-of-sequence token) and scored by patchattn_scoring.py,
the same code as patchattn's own eval, so the two give the same accuracy on the same model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lm_eval.api.task import ConfigurableTask

HERE = Path(__file__).resolve().parent


def _load_scoring():
    spec = importlib.util.spec_from_file_location("patchattn_scoring", HERE / "patchattn_scoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


score_reply = _load_scoring().score_reply


def load_docs(data_file: str, **metadata):
    """The task's prompts as a one-split dataset; ``data_file`` is relative to this directory."""
    import datasets

    with open(HERE / data_file, encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh if line.strip()]
    return {"test": datasets.Dataset.from_list(docs)}


def process_results(doc: dict, results: list[str]) -> dict:
    return {"acc": score_reply(results[0], doc["answers"], doc["match"])}


class NeedleTask(ConfigurableTask):
    """A generate_until task whose token budget is each prompt's own ``max_new_tokens`` (room for its
    answers), unless ``max_gen_toks`` is passed in the generation kwargs."""

    def __init__(self, config: dict | None = None, **kwargs):
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config, **kwargs)

    def construct_requests(self, doc: dict, ctx, **kwargs):
        request = super().construct_requests(doc, ctx, **kwargs)
        for instance in request if isinstance(request, list) else [request]:
            instance.arguments[1].setdefault("max_gen_toks", doc["max_new_tokens"])
        return request
