"""Checks shared by the option objects of each command (:class:`~patchattn.calibrate.options.CalibrationOptions`,
:class:`~patchattn.eval.options.EvalOptions`): each raises :class:`~patchattn.errors.OptionError` naming the option,
so every value is refused before a model loads, with a message that says what would do."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Iterable

from .errors import OptionError  # noqa: F401  (re-exported for the option objects)


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (either end open when None); bools and fractions refused."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise OptionError(name, f"must be a whole number, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"between {low} and {high}"
        raise OptionError(name, f"must be {bounds}, not {value}")
    return int(value)


def number(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the interval from ``low`` to ``high`` (ends open as asked)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise OptionError(name, f"must be a number, not {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise OptionError(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, not {value:g}")
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
