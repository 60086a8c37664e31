"""Registries of small dataclasses by name (strategies, KV policies): recipes refer to them by these names."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, T], kind: str) -> Callable[[T], T]:
    """A class decorator entering a class in ``table`` under its ``name``; ValueError when the name is empty or taken."""

    def register(cls: T) -> T:
        if not cls.name or cls.name in table:
            raise ValueError(f"{kind} name {cls.name!r} is empty or taken")
        table[cls.name] = cls
        return cls

    return register
