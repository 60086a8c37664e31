"""A recipe turned into what the attention function runs: per layer, its heads grouped by strategy class.

The recipe travels as plain data on ``model.config`` (so a saved config loads back patched); :func:`compiled_for`
builds the per-layer plan from that data once and keeps it for the next call with the same data.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .recipe import Recipe
from .strategies import Strategy

RECIPE_KEY = "patchattn_recipe"


@dataclass
class HeadGroup:
    """The heads of one layer whose strategies share a class: one estimate, one vectorized layout."""

    strategies: list[Strategy]  # one per head, in head order
    head_ids: torch.Tensor  # query heads of this group, ascending (CPU)
    all_heads: bool  # the group is the whole layer (no head selection needed)
    _on_device: dict = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> type[Strategy]:
        return type(self.strategies[0])

    def head_ids_on(self, device: torch.device) -> torch.Tensor:
        ids = self._on_device.get(device)
        if ids is None:
            ids = self._on_device[device] = self.head_ids.to(device)
        return ids


@dataclass
class LayerPlan:
    groups: list[HeadGroup]
    all_dense: bool
    dense_rows: int = 0  # the recipe's dense prefix, in query blocks
    density: float | None = None  # the heads' mean calibrated density (None when the recipe has none)


class CompiledRecipe:
    """A recipe turned into per-layer head groups (one per strategy class), cached per recipe dict."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.block_size = recipe.block_size
        self.layers: list[LayerPlan] = []
        for heads in recipe.layers:
            by_kind: dict[type[Strategy], list[tuple[int, Strategy]]] = {}
            for h, plan in enumerate(heads):
                strategy = plan.build()
                by_kind.setdefault(type(strategy), []).append((h, strategy))
            groups = [
                HeadGroup([s for _, s in members], torch.tensor([h for h, _ in members]), len(members) == len(heads))
                for members in by_kind.values()
            ]
            known = [plan.density for plan in heads if plan.density is not None]
            density = sum(known) / len(known) if known and len(known) == len(heads) else None
            self.layers.append(LayerPlan(groups, all(g.kind.name == "dense" for g in groups), recipe.dense_prefix_rows(), density))
        self.graphs: dict = {}  # CUDA graphs of short prefills, by (layer, shapes, dtype, device, scale)
        self.said_dense_below = False  # whether a prompt under min_sparse_tokens was said to prefill densely
        self.said_no_kernel = False  # whether a prefill the kernels could not take was said to run dense


_COMPILED: "OrderedDict[int, tuple[dict, CompiledRecipe]]" = OrderedDict()
_COMPILED_MAX = 16


def compiled_for(config) -> CompiledRecipe | None:
    data = getattr(config, RECIPE_KEY, None)
    if data is None:
        return None
    hit = _COMPILED.get(id(data))
    if hit is None or hit[0] is not data:
        hit = (data, CompiledRecipe(Recipe.from_dict(data)))
        _COMPILED[id(data)] = hit
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return hit[1]
