"""One registry of KV policies by name; a recipe's KV plans refer to policies by these names."""

from __future__ import annotations

from ..checks import shown
from ..registry import registrar
from .base import KVPolicy

POLICIES: dict[str, type[KVPolicy]] = {}
register = registrar(POLICIES, "KV policy")


def policy_class(name) -> type[KVPolicy]:
    """The policy registered as ``name``; ValueError naming the known ones otherwise."""
    if not isinstance(name, str) or name not in POLICIES:
        raise ValueError(f"unknown KV policy {shown(name)}; choose from {', '.join(POLICIES)}")
    return POLICIES[name]
