"""Value checks shared by recipes, strategies and command options: what a hand-edited or typed value must be.

Each ``*_problem`` returns what is wrong ("must be >= 0, not -5") or None; :func:`check_int` and :func:`check_number`
raise ``ValueError("<name> <problem>")`` (recipes and strategies turn it into a ``RecipeError`` naming the head), and
:mod:`patchattn.options` raises an ``OptionError`` with the same words.
"""

from __future__ import annotations

import sys
from typing import Any

# The most tokens a budget may name: positions and token columns are int32 in the kernels and the KV cache.
MAX_TOKENS = 2**31 - 1


def shown(value: Any, width: int = 40) -> str:
    """``repr(value)`` cut to ``width`` characters, for one-line error messages about hand-edited values."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python prints
        return "a huge integer"
    return text if len(text) <= width else text[: width - 3] + "..."


def int_problem(value: Any, minimum: int | None = 0, maximum: int | None = MAX_TOKENS) -> str | None:
    """Unless ``value`` is a Python int (not a bool, not a float such as 0.5 or 64.0: a count is a count) from
    ``minimum`` to ``maximum`` (None: unbounded), what is wrong with it."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    too_high = integer and maximum is not None and value > maximum
    if integer and not too_high and (minimum is None or value >= minimum):
        return None
    if minimum is not None and maximum is not None and maximum != MAX_TOKENS:
        bound = f" between {minimum} and {maximum}"
    elif too_high:
        bound = f" <= {maximum}"
    else:
        bound = f" >= {minimum}" if minimum is not None else ""
    return f"must be an integer{bound}, not {shown(value)}"


def number_problem(value: Any, low: float, high: float | None = None, low_open: bool = False, high_open: bool = False,
                   rounding: float = 0.0) -> str | None:
    """Unless ``value`` is a finite int or float (not a bool) from ``low`` to ``high`` (ends open as asked; None: no
    bound), what is wrong with it. ``rounding``: how far above ``high`` a value may lie and still be taken (statistics
    computed in float32 and rounded can land a hair above 1)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    finite = number and abs(value) <= sys.float_info.max  # False for nan and inf, and for ints no float holds
    if finite:
        above_low = value > low if low_open else value >= low
        below_high = high is None or (value < high if high_open else value <= high + rounding)
        if above_low and below_high:
            return None
    if high is None:
        bound = f"{'>' if low_open else '>='} {low:g}"
    else:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return f"must be a finite number {bound}, not {shown(value)}"


def check_int(name: str, value: Any, minimum: int | None = 0, maximum: int | None = MAX_TOKENS) -> None:
    problem = int_problem(value, minimum, maximum)
    if problem:
        raise ValueError(f"{name} {problem}")


def check_number(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False,
                 high_open: bool = False, rounding: float = 0.0) -> None:
    problem = number_problem(value, low, high, low_open, high_open, rounding)
    if problem:
        raise ValueError(f"{name} {problem}")
