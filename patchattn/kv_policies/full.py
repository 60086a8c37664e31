"""Full heads: every prompt and decode token kept; with ``decode_pages``, each decode step reads Quest's best pages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import KVPolicy
from .registry import register


@register
@dataclass(frozen=True)
class Full(KVPolicy):
    name: ClassVar[str] = "full"

    @property
    def compresses(self) -> bool:
        return self.decode_pages > 0
