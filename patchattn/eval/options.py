"""What ``eval`` is asked to do, checked in full before a model loads or a prompt is built."""

from __future__ import annotations

from dataclasses import dataclass

from .. import options as check
from ..patch import PATCH_BACKENDS
from .ppl_texts import read_ppl_text

TASKS = ("ppl", "passkey", "single", "multikey", "multivalue", "multiquery", "vartrack", "speed")
DEFAULT_TASKS = ("ppl", "passkey", "single", "multikey", "multivalue", "speed")  # multiquery, vartrack on request
MIN_LENGTH = 128  # tokens: shorter prompts cannot hold a task's fixed parts (instructions, needle, question)
BASELINES = ("uniform",)


@dataclass(frozen=True)
class EvalOptions:
    """Every option of an eval; constructing one checks them all (:class:`~patchattn.errors.OptionError`).
    ``speed_runs`` 0 leaves the speed task out; ``baseline`` ``"uniform"`` adds each recipe's uniform twin.
    ``ppl_texts``: paths of the user's own texts for perplexity, each read here (readable UTF-8, not empty); how long
    each is in tokens is checked when the tokenizer is there (:func:`~patchattn.eval.ppl_texts.load_ppl_texts`)."""

    lengths: tuple[int, ...]
    tasks: tuple[str, ...] = DEFAULT_TASKS
    trials: int = 5
    ppl_windows: int = 1
    speed_runs: int = 3
    backend: str = "auto"
    baseline: str | None = None
    seed: int = 0
    ppl_texts: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "lengths", tuple(self.lengths))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "ppl_texts", tuple(str(p) for p in self.ppl_texts))
        if not self.lengths:
            raise check.OptionError("lengths", "needs at least one length")
        for length in self.lengths:
            check.integer("lengths", length, MIN_LENGTH)
        check.all_of("tasks", self.tasks, TASKS)
        check.integer("trials", self.trials, 1)
        check.integer("ppl_windows", self.ppl_windows, 1)
        check.integer("speed_runs", self.speed_runs, 0)
        check.one_of("backend", self.backend, PATCH_BACKENDS)
        if self.baseline is not None:
            check.one_of("baseline", self.baseline, BASELINES)
        check.integer("seed", self.seed)
        for path in self.ppl_texts:
            read_ppl_text(path)

    @property
    def run_tasks(self) -> list[str]:
        """The tasks to run: the ones asked for, speed last and only with timed runs."""
        return [t for t in self.tasks if t != "speed"] + (["speed"] if self.speed_runs else [])
