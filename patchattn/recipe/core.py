"""The :class:`Recipe`: per layer, per head, which strategy and budget; what it asks of the model; its JSON."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_int, shown
from ..errors import RecipeError
from ..io import write_json_atomic
from ..layout import BLOCK_SIZES, num_blocks
from ..strategies import get_strategy
from .identity import IDENTITY_FIELDS, model_description, model_identity
from .plans import HeadPlan, KVPlan, derive_kv_plans
from .schema import READABLE_VERSIONS, SCHEMA_VERSION, check_calibration, json_fields


@dataclass
class Recipe:
    model: dict[str, Any]
    layers: list[list[HeadPlan]]
    block_size: int = 64
    calibration: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    kv_layers: list[list[KVPlan]] | None = None  # per layer, per KV head; None: derived from the prefill plans
    # Prompts shorter than this prefill with dense attention: below some length (small models, short prompts) the
    # layouts cost more host time than the attention they skip (like vLLM's sparse-attention threshold). 0: always.
    min_sparse_tokens: int = 0
    # The first this many tokens' query rows read every causal block (they are cheap: (W / N)^2 of the blocks) and
    # token budgets calibrated at N starve them otherwise. Calibration counts it in the density it allocates.
    dense_prefix_tokens: int = 0
    # Per layer, this device's prefill break-even: prompts shorter than it prefill that layer densely (fitted by
    # calibration on a GPU, patchattn.calibrate.breakeven). None: every layer follows min_sparse_tokens alone.
    layer_min_tokens: list[int] | None = None

    def dense_prefix_rows(self) -> int:
        return num_blocks(self.dense_prefix_tokens, self.block_size)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def uniform(cls, config, strategy: str = "dense", block_size: int = 64, name: str = "", **params) -> "Recipe":
        """Every head the same strategy and budget."""
        ident = model_identity(config)
        get_strategy(strategy, **params)  # validate early
        layers = [[HeadPlan(strategy, dict(params)) for _ in range(ident["num_heads"])] for _ in range(ident["num_layers"])]
        return cls(model=ident, layers=layers, block_size=block_size, name=name or strategy)

    # ---- queries ------------------------------------------------------------------------------
    @property
    def mean_density(self) -> float | None:
        """Mean calibrated density over the heads that have one (a model's own sliding-window layers have none: they
        keep the model's window and are not counted against a sparsity target); None when a head the recipe
        chose for has none."""
        windowed = {int(i) for i in (self.calibration or {}).get("model_windows", {})}
        values = [h.density for li, layer in enumerate(self.layers) if li not in windowed for h in layer]
        return None if not values or any(v is None for v in values) else sum(values) / len(values)

    def kv_plans(self) -> list[list[KVPlan]]:
        """Per layer, per KV head: the recipe's own decode plans, or those its prefill plans imply."""
        if self.kv_layers is not None:
            return self.kv_layers
        return derive_kv_plans(self.layers, int(self.model.get("num_kv_heads") or self.model["num_heads"]))

    @property
    def compresses_kv(self) -> bool:
        """Whether any KV head keeps or reads less than the full cache (then generation uses the budgeted cache)."""
        return any(p.compresses for layer in self.kv_plans() for p in layer)

    def verified_lengths(self) -> list[int]:
        """The prompt lengths a loss-bound calibration verified this recipe at and runs sparse, shortest first (none
        for recipes calibrated to a fixed target)."""
        rows = (self.calibration or {}).get("verified") or []
        return sorted({row["length"] for row in rows if row["sparse"]})

    def strategy_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            for head in layer:
                counts[head.strategy] = counts.get(head.strategy, 0) + 1
        return counts

    def kv_policy_counts(self) -> dict[str, int]:
        """KV heads per decode policy ("window", "snapkv + Quest pages", ...)."""
        counts: dict[str, int] = {}
        for layer in self.kv_plans():
            for plan in layer:
                name = plan.policy + (" + Quest pages" if plan.decode_pages else "")
                counts[name] = counts.get(name, 0) + 1
        return counts

    def plan_hash(self) -> str:
        """A short hash of what the recipe makes the model do (block size, every head's strategy and parameters, the
        KV plans, the dense thresholds), not of its name or calibration statistics: two reports ran the same plan
        when their hashes agree."""
        plan = {
            "block_size": self.block_size,
            "heads": [[[h.strategy, sorted(h.params.items())] for h in layer] for layer in self.layers],
            "kv": [[p.to_dict() for p in layer] for layer in self.kv_plans()],  # written out or implied: the same
            "min_sparse_tokens": self.min_sparse_tokens,
            "dense_prefix_tokens": self.dense_prefix_tokens,
            **({"layer_min_tokens": self.layer_min_tokens} if self.layer_min_tokens else {}),
        }
        return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def check_model(self, config) -> None:
        """Raise RecipeError unless this recipe was made for a model of this geometry: every identity field is
        compared, not only the hash (a hand-edited description with a recomputed hash must not pass either)."""
        ident = model_identity(config)
        diffs = [f"{k}: recipe {shown(self.model.get(k))} vs model {ident[k]!r}" for k in IDENTITY_FIELDS if self.model.get(k) != ident[k]]
        if diffs or ident["config_hash"] != self.model.get("config_hash"):
            raise RecipeError(
                f"recipe was made for another model ({'; '.join(diffs) or 'config hash differs'}); "
                "calibrate a recipe for this model with `patchattn calibrate`"
            )

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION if self.layer_min_tokens else 2,  # the oldest that says it all
            "name": self.name,
            "model": dict(self.model),
            "block_size": self.block_size,
            "calibration": self.calibration,
            "layers": [
                {"heads": [h.to_dict() for h in layer], **({"kv_heads": [p.to_dict() for p in kv]} if kv is not None else {}),
                 **({"min_sparse_tokens": m} if m else {})}
                for layer, kv, m in zip(self.layers, self.kv_layers or [None] * len(self.layers),
                                        self.layer_min_tokens or [0] * len(self.layers))
            ],
            **({"min_sparse_tokens": self.min_sparse_tokens} if self.min_sparse_tokens else {}),
            **({"dense_prefix_tokens": self.dense_prefix_tokens} if self.dense_prefix_tokens else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        """Parse and check a recipe's JSON data. Anything malformed (a wrong type, a value out of range, an unknown
        field, counts that disagree with its own model description) raises RecipeError naming the field: a recipe
        that loads must run."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source} is not a recipe (expected a JSON object)")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise RecipeError(
                f"{source} has schema version {shown(version)}, this patchattn reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; re-run `patchattn calibrate` to make a current recipe"
            )
        try:
            return cls._parse(data)
        except ValueError as exc:
            raise RecipeError(f"{source}: {exc}; correct it or make a new recipe with `patchattn calibrate`") from None

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> "Recipe":
        """The recipe in ``data`` (schema version checked); ValueError saying where on anything malformed."""
        json_fields(data, "the recipe", required=("schema_version", "model", "block_size", "layers"),
                    optional=("name", "calibration", "min_sparse_tokens", "dense_prefix_tokens"))
        model = model_description(data["model"])
        block_size = data["block_size"]
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size {shown(block_size)} unsupported: use {', '.join(map(str, BLOCK_SIZES))}")
        min_sparse, dense_prefix = data.get("min_sparse_tokens", 0), data.get("dense_prefix_tokens", 0)
        check_int("min_sparse_tokens", min_sparse)
        check_int("dense_prefix_tokens", dense_prefix)
        name, calibration = data.get("name", ""), data.get("calibration", {})
        if not isinstance(name, str):
            raise ValueError(f"name must be a string, not {shown(name)}")
        check_calibration(calibration, model["num_layers"])
        layers, kv_layers, layer_min = _parse_layers(data["layers"], model)
        return cls(
            model=model, layers=layers, block_size=block_size, calibration=calibration, name=name,
            kv_layers=kv_layers, min_sparse_tokens=min_sparse, dense_prefix_tokens=dense_prefix,
            layer_min_tokens=layer_min if any(layer_min) else None,
        )

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"recipe {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"recipe {path} is not valid JSON (line {exc.lineno}: {exc.msg}); re-run `patchattn calibrate`") from None
        except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, nesting too deep to parse
            raise RecipeError(f"recipe {path} cannot be parsed ({type(exc).__name__}: {shown(str(exc), 80)}); re-run `patchattn calibrate`") from None
        recipe = cls.from_dict(data, source=f"recipe {path}")
        recipe.name = recipe.name or path.stem
        return recipe


def _parse_layers(layers_data: Any, model: dict[str, Any]) -> tuple[list[list[HeadPlan]], list[list[KVPlan]] | None, list[int]]:
    """The recipe's ``layers``: per layer, its head plans, (all layers or none) its KV plans and its break-even
    (0 where none is given); ValueError saying where on counts that disagree with the recipe's own (checked) model
    description or a malformed plan."""
    if not isinstance(layers_data, list):
        raise ValueError(f"layers must be a list, not {shown(layers_data)}")
    n_layers, n_heads, n_kv = model["num_layers"], model["num_heads"], model["num_kv_heads"]
    if len(layers_data) != n_layers:
        raise ValueError(f"layer/head counts do not match its own model description: {len(layers_data)} layers, num_layers {n_layers}")
    layers, kv_layers, layer_min = [], [], []
    for li, layer in enumerate(layers_data):
        json_fields(layer, f"layer {li}", required=("heads",), optional=("kv_heads", "min_sparse_tokens"))
        layer_min.append(layer.get("min_sparse_tokens", 0))
        check_int(f"layer {li} min_sparse_tokens", layer_min[-1])
        heads = layer["heads"]
        if not isinstance(heads, list) or len(heads) != n_heads:
            raise ValueError(f"layer/head counts do not match its own model description: layer {li} heads must be a list of "
                             f"{n_heads} (num_heads), not {shown(heads) if not isinstance(heads, list) else len(heads)}")
        layers.append([HeadPlan.from_dict(head, f"layer {li} head {hi}") for hi, head in enumerate(heads)])
        if "kv_heads" in layer:
            kv = layer["kv_heads"]
            if not isinstance(kv, list) or len(kv) != n_kv:
                raise ValueError(f"layer {li} kv_heads must be a list, one per KV head ({n_kv}), not {shown(kv) if not isinstance(kv, list) else len(kv)}")
            kv_layers.append([_kv_plan(plan, f"layer {li} kv head {ki}") for ki, plan in enumerate(kv)])
    if kv_layers and len(kv_layers) != len(layers):
        raise ValueError(f"kv_heads must be given for every layer, one per KV head ({n_kv}), or for none")
    return layers, kv_layers or None, layer_min


def _kv_plan(data: Any, where: str) -> KVPlan:
    try:
        return KVPlan.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
