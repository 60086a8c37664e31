"""Checks shared by the option objects of each command (:class:`~patchattn.calibrate.options.CalibrationOptions`,
:class:`~patchattn.eval.options.EvalOptions`): each raises :class:`~patchattn.errors.OptionError` naming the option,
so every value is refused before a model loads, with a message that says what would do."""

from __future__ import annotations

from typing import Iterable

from .checks import int_problem, number_problem
from .errors import OptionError  # noqa: F401  (re-exported for the option objects)


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (either end open when None); bools and fractions refused."""
    problem = int_problem(value, low, high)
    if problem:
        raise OptionError(name, problem)
    return value


def number(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the interval from ``low`` to ``high`` (ends open as asked)."""
    problem = number_problem(value, low, high, low_open, high_open)
    if problem:
        raise OptionError(name, problem)
    return float(value)


def one_of(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise OptionError(name, f"must be one of {', '.join(map(str, choices))}, not {value!r}")


def all_of(name: str, values: Iterable, choices: Iterable) -> None:
    """Every item of ``values`` among ``choices``, and at least one item."""
    values, choices = tuple(values), tuple(choices)
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise OptionError(name, f"names unknown {', '.join(map(str, unknown))}; choose from {', '.join(map(str, choices))}")
    if not values:
        raise OptionError(name, f"needs at least one of {', '.join(map(str, choices))}")
