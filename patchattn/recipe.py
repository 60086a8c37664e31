"""Recipes: per layer, per head, which strategy and budget. Plain data, JSON with a schema version."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .io import write_json_atomic
from .strategies import Strategy, get_strategy

SCHEMA_VERSION = 1
_IDENTITY_FIELDS = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")


def model_identity(config) -> dict[str, Any]:
    """What a recipe must match: architecture, attention geometry, and a hash of those fields."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = config.num_attention_heads
    identity = {
        "architecture": (getattr(config, "architectures", None) or ["?"])[0],
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "num_heads": num_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }
    canonical = json.dumps({k: identity[k] for k in _IDENTITY_FIELDS}, sort_keys=True)
    identity["config_hash"] = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return identity


@dataclass
class HeadPlan:
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    density: float | None = None  # fraction of causal blocks kept at the calibration length
    kept_mass: float | None = None  # attention mass kept on sampled rows at the calibration length
    output_error: float | None = None  # relative attention-output error on those rows

    def build(self) -> Strategy:
        return get_strategy(self.strategy, **self.params)

    def to_dict(self) -> dict[str, Any]:
        d = {"strategy": self.strategy, "params": dict(self.params)}
        if self.density is not None:
            d["density"] = round(float(self.density), 6)
        if self.kept_mass is not None:
            d["kept_mass"] = round(float(self.kept_mass), 6)
        if self.output_error is not None:
            d["output_error"] = round(float(self.output_error), 6)
        return d


@dataclass
class Recipe:
    model: dict[str, Any]
    layers: list[list[HeadPlan]]
    block_size: int = 64
    calibration: dict[str, Any] = field(default_factory=dict)
    name: str = ""

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
        values = [h.density for layer in self.layers for h in layer]
        return None if any(v is None for v in values) else sum(values) / len(values)

    def strategy_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            for head in layer:
                counts[head.strategy] = counts.get(head.strategy, 0) + 1
        return counts

    def check_model(self, config) -> None:
        """Raise RecipeError unless this recipe was made for a model of this geometry."""
        ident = model_identity(config)
        if ident["config_hash"] != self.model.get("config_hash"):
            diffs = [f"{k}: recipe {self.model.get(k)} vs model {ident[k]}" for k in _IDENTITY_FIELDS if self.model.get(k) != ident[k]]
            raise RecipeError(
                f"recipe was made for another model ({'; '.join(diffs) or 'config hash differs'}); "
                "calibrate a recipe for this model with `patchattn calibrate`"
            )

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "model": dict(self.model),
            "block_size": self.block_size,
            "calibration": self.calibration,
            "layers": [{"heads": [h.to_dict() for h in layer]} for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{source} is not a recipe (expected a JSON object)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RecipeError(
                f"{source} has schema version {version!r}, this patchattn reads version {SCHEMA_VERSION}; "
                "re-run `patchattn calibrate` to make a current recipe"
            )
        try:
            model = data["model"]
            block_size = int(data["block_size"])
            layers = []
            for li, layer in enumerate(data["layers"]):
                heads = []
                for hi, head in enumerate(layer["heads"]):
                    plan = HeadPlan(
                        head["strategy"], dict(head.get("params", {})), head.get("density"), head.get("kept_mass"), head.get("output_error")
                    )
                    try:
                        plan.build()
                    except ValueError as exc:
                        raise RecipeError(f"{source}: layer {li} head {hi}: {exc}") from None
                    heads.append(plan)
                layers.append(heads)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(f"{source} is malformed ({type(exc).__name__}: {exc}); re-run `patchattn calibrate`") from None
        if block_size not in (16, 32, 64, 128, 256):
            raise RecipeError(f"{source}: block_size {block_size} unsupported; use 16, 32, 64, 128 or 256")
        if len(layers) != model.get("num_layers") or any(len(l) != model.get("num_heads") for l in layers):
            raise RecipeError(f"{source}: layer/head counts do not match its own model description")
        return cls(model=model, layers=layers, block_size=block_size, calibration=data.get("calibration", {}), name=data.get("name", ""))

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
        recipe = cls.from_dict(data, source=f"recipe {path}")
        recipe.name = recipe.name or path.stem
        return recipe
