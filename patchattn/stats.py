"""Achieved sparsity, as the patched attention actually ran it.

The attention function reports, for every prefill call, how many causal blocks it computed out of how
many there were, and which implementation ran it; ``record_sparsity`` sums them over everything run inside it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field


@dataclass
class SparsityRecord:
    kept_blocks: float = 0.0
    causal_blocks: float = 0.0
    calls: int = 0
    per_layer: dict[int, list[float]] = field(default_factory=dict)  # layer -> [kept, causal]
    kernels: dict[str, int] = field(default_factory=dict)  # prefill calls per implementation ("gluon-hopper", "triton", "torch", "sdpa")

    @property
    def density(self) -> float | None:
        return None if not self.causal_blocks else self.kept_blocks / self.causal_blocks

    @property
    def sparsity(self) -> float | None:
        return None if self.density is None else 1.0 - self.density

    @contextlib.contextmanager
    def paused(self):
        """Stop recording into this record for a block (e.g. timed runs, which must not read counts back)."""
        was = self in _ACTIVE
        if was:
            _ACTIVE.remove(self)
        try:
            yield self
        finally:
            if was:
                _ACTIVE.append(self)


_ACTIVE: list[SparsityRecord] = []


def is_recording() -> bool:
    return bool(_ACTIVE)


def report(layer_idx: int, kept_blocks: float, causal_blocks: float, kernel: str | None = None) -> None:
    for rec in _ACTIVE:
        if kernel is not None:
            rec.kernels[kernel] = rec.kernels.get(kernel, 0) + 1
        rec.kept_blocks += kept_blocks
        rec.causal_blocks += causal_blocks
        rec.calls += 1
        slot = rec.per_layer.setdefault(layer_idx, [0.0, 0.0])
        slot[0] += kept_blocks
        slot[1] += causal_blocks


@contextlib.contextmanager
def record_sparsity():
    rec = SparsityRecord()
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)
