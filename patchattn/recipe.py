"""Recipes: per layer, per head, which strategy and budget. Plain data, JSON with a schema version.

Schema 2 adds, per layer, a decode plan per KV head (``kv_heads``): what the KV cache keeps of that head and
how the decode step reads it. Schema 1 recipes (prefill plans only) still load; their KV plans are derived
from the prefill plans (:func:`derive_kv_plans`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .io import write_json_atomic
from .layout import num_blocks
from .strategies import Strategy, get_strategy

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
KV_POLICIES = ("full", "window", "snapkv")
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
class KVPlan:
    """What the KV cache keeps of one KV head, and how the decode step reads it.

    ``policy``: ``"full"`` keeps every token; ``"window"`` keeps the first ``sink_tokens`` and a rolling
    window of the last ``window_tokens`` (streaming heads: memory stays constant); ``"snapkv"`` keeps
    ``budget_tokens`` prompt tokens chosen after prefill by the attention of the prompt's last ``window_tokens``
    queries (SnapKV), then every generated token. ``decode_pages`` > 0 (``full`` and ``snapkv``): each decode
    step reads only that many cache pages per head, the ones whose key bounds promise the largest scores
    for the current query (Quest), always including the first and the newest page.
    """

    policy: str = "full"
    sink_tokens: int = 0
    window_tokens: int = 0
    budget_tokens: int = 0
    decode_pages: int = 0

    def __post_init__(self):
        if self.policy not in KV_POLICIES:
            raise ValueError(f"unknown KV policy {self.policy!r}; choose from {', '.join(KV_POLICIES)}")
        if min(self.sink_tokens, self.window_tokens, self.budget_tokens, self.decode_pages) < 0:
            raise ValueError("KV plan sizes must be >= 0")
        if self.policy == "window" and self.window_tokens < 1:
            raise ValueError("a window KV plan needs window_tokens >= 1")
        if self.policy == "snapkv" and not 0 < self.window_tokens <= self.budget_tokens:
            raise ValueError("a snapkv KV plan needs 0 < window_tokens <= budget_tokens")
        if self.policy == "window" and self.decode_pages:
            raise ValueError("decode_pages applies to full and snapkv KV plans, not window")

    @property
    def compresses(self) -> bool:
        """Whether this head keeps or reads less than the full cache."""
        return self.policy != "full" or self.decode_pages > 0

    def kept_tokens(self, n_tokens: int) -> int:
        """Prompt tokens this head holds after a prefill of ``n_tokens``."""
        if self.policy == "window":
            return min(n_tokens, self.sink_tokens + self.window_tokens)
        if self.policy == "snapkv":
            return min(n_tokens, self.budget_tokens)
        return n_tokens

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"policy": self.policy}
        for name in ("sink_tokens", "window_tokens", "budget_tokens", "decode_pages"):
            if getattr(self, name):
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KVPlan":
        unknown = set(data) - {"policy", "sink_tokens", "window_tokens", "budget_tokens", "decode_pages"}
        if unknown:
            raise ValueError(f"unknown KV plan field(s) {', '.join(sorted(unknown))}")
        return cls(**{k: (v if k == "policy" else int(v)) for k, v in data.items()})


def derive_kv_plans(layers: list[list[HeadPlan]], num_kv_heads: int) -> list[list[KVPlan]]:
    """KV plans implied by prefill plans: a KV head whose query heads are all ``streaming`` keeps their
    (largest) sink and window and nothing else, as DuoAttention's streaming heads do; any other keeps all."""
    plans = []
    for heads in layers:
        group = len(heads) // num_kv_heads
        layer = []
        for kvh in range(num_kv_heads):
            members = heads[kvh * group : (kvh + 1) * group]
            if members and all(h.strategy == "streaming" for h in members):
                sink = max(int(h.params.get("sink_tokens", 64)) for h in members)
                window = max(int(h.params.get("window_tokens", 1024)) for h in members)
                layer.append(KVPlan("window", sink_tokens=sink, window_tokens=window))
            else:
                layer.append(KVPlan("full"))
        plans.append(layer)
    return plans


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

    def strategy_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            for head in layer:
                counts[head.strategy] = counts.get(head.strategy, 0) + 1
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
        }
        return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]

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
            "layers": [
                {"heads": [h.to_dict() for h in layer], **({"kv_heads": [p.to_dict() for p in kv]} if kv is not None else {})}
                for layer, kv in zip(self.layers, self.kv_layers or [None] * len(self.layers))
            ],
            **({"min_sparse_tokens": self.min_sparse_tokens} if self.min_sparse_tokens else {}),
            **({"dense_prefix_tokens": self.dense_prefix_tokens} if self.dense_prefix_tokens else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{source} is not a recipe (expected a JSON object)")
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise RecipeError(
                f"{source} has schema version {version!r}, this patchattn reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; re-run `patchattn calibrate` to make a current recipe"
            )
        try:
            model = data["model"]
            block_size = int(data["block_size"])
            min_sparse = int(data.get("min_sparse_tokens", 0))
            dense_prefix = int(data.get("dense_prefix_tokens", 0))
            layers, kv_layers = [], []
            for li, layer in enumerate(data["layers"]):
                if "kv_heads" in layer:
                    try:
                        kv_layers.append([KVPlan.from_dict(dict(p)) for p in layer["kv_heads"]])
                    except ValueError as exc:
                        raise RecipeError(f"{source}: layer {li} kv_heads: {exc}") from None
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
        if min_sparse < 0 or dense_prefix < 0:
            raise RecipeError(f"{source}: min_sparse_tokens and dense_prefix_tokens must be 0 or more")
        if block_size not in (16, 32, 64, 128, 256):
            raise RecipeError(f"{source}: block_size {block_size} unsupported; use 16, 32, 64, 128 or 256")
        if len(layers) != model.get("num_layers") or any(len(l) != model.get("num_heads") for l in layers):
            raise RecipeError(f"{source}: layer/head counts do not match its own model description")
        n_kv = model.get("num_kv_heads") or model.get("num_heads")
        if kv_layers and (len(kv_layers) != len(layers) or any(len(l) != n_kv for l in kv_layers)):
            raise RecipeError(f"{source}: kv_heads must be given for every layer, one per KV head ({n_kv})")
        return cls(
            model=model, layers=layers, block_size=block_size, calibration=data.get("calibration", {}),
            name=data.get("name", ""), kv_layers=kv_layers or None, min_sparse_tokens=min_sparse,
            dense_prefix_tokens=dense_prefix,
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
        recipe = cls.from_dict(data, source=f"recipe {path}")
        recipe.name = recipe.name or path.stem
        return recipe
