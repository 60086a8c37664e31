"""Layers that choose among fewer strategies than the rest: ``--layer-strategies 5-29=dense,streaming,block_topk``.

By default (``layer_budgets="kept"``) the allocation first runs without the rules, and each rule's layers then choose
among their strategies within the density that allocation gave them: the layers outside every rule keep the
unrestricted plans, and no budget moves between ranges. With ``"shared"`` one global budget is spent over every head,
a head of a restricted layer offered only the candidates of its rule's strategies; since a restricted strategy scores
worse per block, the restricted range then draws density from the rest (on SmolLM2 at 8K, from layers 12-20, where
email's copying heads are, into layers 5-10: email +4.9% shared, +3.0% kept). What it is for: on SmolLM2 at 8K the
vertical-slash heads hold copy-heavy text (email) and lose the passkey, block top-k heads the reverse
(``examples/unseen-kinds/gpu-sweep/``), and a rule per range of layers tries one where it helps and the other
elsewhere, each calibrated at the same sparsity."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import OptionError
from .allocate import allocate

FORBIDDEN = -1e6  # the utility of a candidate a rule leaves out: never chosen while any allowed one remains
_SPEC = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*=\s*(.+)$")


@dataclass(frozen=True)
class LayerRule:
    """Layers ``first`` to ``last`` (inclusive) choose among ``strategies`` only."""

    first: int
    last: int
    strategies: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str, offered: Sequence[str]) -> "LayerRule":
        """From ``"A-B=name,name"`` (or ``"A=..."`` for one layer); each name among ``offered`` (the calibration's
        strategies)."""
        match = _SPEC.match(spec) if isinstance(spec, str) else None
        if match is None:
            raise OptionError("layer_strategies",
                              f"takes FIRST-LAST=STRATEGY,STRATEGY (e.g. 5-29=dense,block_topk), not {spec!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        names = tuple(n.strip() for n in match.group(3).split(",") if n.strip())
        if last < first:
            raise OptionError("layer_strategies", f"{spec!r}: the range ends before it starts")
        unknown = [n for n in names if n not in offered]
        if unknown or not names:
            raise OptionError("layer_strategies", f"{spec!r} names {', '.join(unknown) or 'no strategy'}; each must be "
                                                  f"one of the calibration's strategies ({', '.join(offered)})")
        return cls(first, last, names)

    def spec(self) -> str:
        return f"{self.first}-{self.last}={','.join(self.strategies)}"


def parse_rules(specs: Sequence[str], offered: Sequence[str]) -> tuple[LayerRule, ...]:
    rules = tuple(LayerRule.parse(s, offered) for s in specs)
    for i, a in enumerate(rules):
        for b in rules[i + 1:]:
            if a.first <= b.last and b.first <= a.last:
                raise OptionError("layer_strategies", f"{a.spec()} and {b.spec()} overlap: give each layer one rule")
    return rules


def check_layers(rules: Sequence[LayerRule], n_layers: int) -> None:
    """Every rule within the model's ``n_layers`` (checked once the model is loaded, before anything is scored)."""
    for rule in rules:
        if rule.last >= n_layers:
            raise OptionError("layer_strategies", f"{rule.spec()} reaches layer {rule.last}, but the model has {n_layers} "
                                                  f"layers (0-{n_layers - 1})")


def restrict(utility: torch.Tensor, free: Sequence[int], candidate_names: Sequence[str],
             rules: Sequence[LayerRule]) -> torch.Tensor:
    """``utility`` (F, H, C) over the free layers, with each rule's left-out candidates set to :data:`FORBIDDEN`."""
    if not rules:
        return utility
    utility = utility.clone()
    for f, layer in enumerate(free):
        for rule in rules:
            if rule.first <= layer <= rule.last:
                left_out = [c for c, name in enumerate(candidate_names) if name not in rule.strategies]
                utility[f, :, left_out] = FORBIDDEN
    return utility


LAYER_BUDGETS = ("shared", "kept")


def choose(density: torch.Tensor, utility: torch.Tensor, free: Sequence[int], candidate_names: Sequence[str],
           rules: Sequence[LayerRule], target_density: float, layer_budgets: str) -> torch.Tensor:
    """One candidate per head, (F, H) over the free layers: ``density`` and ``utility`` (F, H, C) allocated to
    ``target_density`` under ``rules``, sharing one budget or keeping each rule's (see the module)."""
    n_free, n_cand = density.shape[0], density.shape[-1]
    restricted = restrict(utility, free, candidate_names, rules)
    if layer_budgets == "shared" or not rules:
        return allocate(density.reshape(-1, n_cand), restricted.reshape(-1, n_cand), target_density).view(n_free, -1)
    choice = allocate(density.reshape(-1, n_cand), utility.reshape(-1, n_cand), target_density).view(n_free, -1)
    for rule in rules:
        rows = [f for f, layer in enumerate(free) if rule.first <= layer <= rule.last]
        if not rows:
            continue
        d = density[rows]
        budget = float(d.gather(-1, choice[rows][..., None]).mean())
        choice[rows] = allocate(d.reshape(-1, n_cand), restricted[rows].reshape(-1, n_cand), budget).view(len(rows), -1)
    return choice
