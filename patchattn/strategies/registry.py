"""One registry of strategies by name; recipes refer to strategies by these names."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..registry import registrar
from .base import Strategy, shown

STRATEGIES: dict[str, type[Strategy]] = {}
register = registrar(STRATEGIES, "strategy")


def get_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy from its registry name and parameters; raise ValueError on an unknown name, an unknown
    parameter (a misspelt budget must not silently run at its default) or a bad value (the class's own checks)."""
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"unknown strategy {shown(name)}; known: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [str(p) for p in params if p not in fields]
    if unknown:
        takes = f"it takes {', '.join(fields)}" if fields else "it takes none"
        raise ValueError(f"bad parameters for strategy {name!r}: unknown {', '.join(sorted(unknown))} ({takes})")
    return cls(**params)
