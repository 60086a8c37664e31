"""A recipe turned into what the attention function runs: per layer, its heads grouped by strategy class.

One :class:`CompiledRecipe` per recipe: :func:`compile_recipe` builds it the first time a recipe is patched in and
finds it again (by the recipe's whole data) on every later patch with the same recipe. The config holds only the
recipe's data (:mod:`patchattn.config_keys`); :func:`compiled_for`, which the attention function calls, finds the
compiled recipe from that data object without rebuilding it, and builds it once for a config that was loaded with a
recipe rather than patched.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .config_keys import RECIPE_KEY, recipe_data  # noqa: F401  (RECIPE_KEY: imported from here too)
from .recipe import Recipe
from .strategies import Strategy


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
    min_tokens: int = 0  # this device's break-even: shorter prompts prefill this layer densely (not under backend "sparse")
    # finished layouts (counts, ids, density) by prompt shape, when every head's layout depends on positions alone
    static_layouts: "OrderedDict[tuple, tuple]" = field(default_factory=OrderedDict, repr=False)


class CompiledRecipe:
    """A recipe turned into per-layer head groups (one per strategy class). ``data``: the recipe as the config holds
    it (its ``to_dict()``, unless given)."""

    def __init__(self, recipe: Recipe, data: dict | None = None):
        self.recipe = recipe
        self.data = recipe.to_dict() if data is None else data
        self.block_size = recipe.block_size
        self.layers: list[LayerPlan] = []
        break_even = recipe.layer_min_tokens or [0] * len(recipe.layers)
        for heads, layer_min in zip(recipe.layers, break_even):
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
            self.layers.append(LayerPlan(groups, all(g.kind.name == "dense" for g in groups), recipe.dense_prefix_rows(), density,
                                         layer_min))
        self.graphs: dict = {}  # CUDA graphs of short prefills, by (layer, shapes, dtype, device, scale)
        # read by every forward's cache hook: derived once (deriving the KV plans costs more than a layer's dense call)
        self.compresses_kv = recipe.compresses_kv
        self.reset_notices()

    def reset_notices(self) -> None:
        """A new patch with this recipe: what the attention function says once per patch may be said again."""
        self.said_dense_below = False  # whether a prompt under min_sparse_tokens was said to prefill densely
        self.said_chunk_dense = False  # whether a sparse layer's chunk was said to run dense
        self.said_break_even: set[int] = set()  # prompt lengths already said to prefill some layers densely (break-even)
        self.said_no_kernel = False  # whether a prefill the kernels could not take was said to run dense


_COMPILED_MAX = 16
_BY_CONTENT: "OrderedDict[str, CompiledRecipe]" = OrderedDict()  # by content_key of the recipe's data
_BY_DATA: "OrderedDict[int, tuple[dict, CompiledRecipe]]" = OrderedDict()  # by id() of a data dict a config holds


def content_key(data: dict) -> str:
    """What a compiled recipe depends on: the recipe's whole data (its plan_hash leaves out the name, the densities
    and the verified lengths, which the compiled recipe reads too)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _remember(table: OrderedDict, key, value):
    table[key] = value
    table.move_to_end(key)
    while len(table) > _COMPILED_MAX:
        table.popitem(last=False)
    return value


def compile_recipe(recipe: Recipe) -> CompiledRecipe:
    """The compiled form of ``recipe``: built once, then found again for any recipe with the same data. Its ``data`` is
    a copy of the recipe's, so later edits to ``recipe`` change nothing already patched in."""
    data = copy.deepcopy(recipe.to_dict())
    key = content_key(data)
    compiled = _BY_CONTENT.get(key)
    if compiled is None:
        compiled = CompiledRecipe(Recipe.from_dict(data), data)
    _remember(_BY_CONTENT, key, compiled)
    _remember(_BY_DATA, id(compiled.data), (compiled.data, compiled))
    return compiled


def compiled_for(config) -> CompiledRecipe | None:
    """The compiled recipe of a patched config (None: not patched). A patch's config holds its compiled recipe's own
    ``data``, found by identity; a config loaded with a recipe (not patched) gets one the first time, its notices
    reset as a patch would."""
    data = recipe_data(config)
    if data is None:
        return None
    hit = _BY_DATA.get(id(data))
    if hit is None or hit[0] is not data:
        compiled = compile_recipe(Recipe.from_dict(data))
        compiled.reset_notices()
        hit = _remember(_BY_DATA, id(data), (data, compiled))
    return hit[1]
