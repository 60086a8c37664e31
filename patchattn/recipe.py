"""Recipes: per layer, per head, which strategy and budget. Plain data, JSON with a schema version.

Schema 2 adds, per layer, a decode plan per KV head (``kv_heads``): what the KV cache keeps of that head and
how the decode step reads it. Schema 1 recipes (prefill plans only) still load; their KV plans are derived
from the prefill plans (:func:`derive_kv_plans`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .hf import text_config
from .io import write_json_atomic
from .kv_policies import POLICIES, KVPolicy, policy_class
from .layout import BLOCK_SIZES, num_blocks
from .strategies import Strategy, get_strategy
from .strategies.base import check_int, check_number, shown

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
KV_POLICIES = tuple(POLICIES)  # the KV policies' names (:mod:`patchattn.kv_policies`)
_IDENTITY_FIELDS = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")
_KV_SIZES = ("sink_tokens", "window_tokens", "budget_tokens", "decode_pages")
# Calibration writes float32 statistics rounded to 6 places: a fraction of the whole may land a hair above 1.
_FRACTION_ROUNDING = 1e-3


def model_identity(config) -> dict[str, Any]:
    """What a recipe must match: architecture, attention geometry, and a hash of those fields."""
    config = text_config(config)
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
    identity["config_hash"] = _config_hash(identity)
    return identity


def _config_hash(identity: dict[str, Any]) -> str:
    canonical = json.dumps({k: identity[k] for k in _IDENTITY_FIELDS}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class HeadPlan:
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    density: float | None = None  # fraction of causal blocks kept at the calibration length
    kept_mass: float | None = None  # attention mass kept on sampled rows at the calibration length
    output_error: float | None = None  # relative attention-output error on those rows

    def build(self) -> Strategy:
        return get_strategy(self.strategy, **self.params)

    def check(self) -> None:
        """Raise ValueError naming the field unless the strategy builds and each statistic is None or in its range
        (density and kept mass are fractions; the output error is relative and may exceed 1)."""
        self.build()
        for name, high in (("density", 1.0), ("kept_mass", 1.0), ("output_error", None)):
            value = getattr(self, name)
            if value is not None:
                check_number(name, value, 0.0, high, rounding=_FRACTION_ROUNDING)

    def to_dict(self) -> dict[str, Any]:
        d = {"strategy": self.strategy, "params": dict(self.params)}
        if self.density is not None:
            d["density"] = round(float(self.density), 6)
        if self.kept_mass is not None:
            d["kept_mass"] = round(float(self.kept_mass), 6)
        if self.output_error is not None:
            d["output_error"] = round(float(self.output_error), 6)
        return d


@dataclass(frozen=True)
class KVPlan:
    """What the KV cache keeps of one KV head, and how the decode step reads it: a recipe's JSON form of a
    :mod:`KV policy <patchattn.kv_policies>`, which :meth:`build` gives.

    ``policy``: ``"full"`` keeps every token; ``"window"`` keeps the first ``sink_tokens`` and a rolling
    window of the last ``window_tokens`` (streaming heads: memory stays constant); ``"snapkv"`` keeps
    ``budget_tokens`` prompt tokens chosen after prefill by the attention of the prompt's last ``window_tokens``
    queries (SnapKV), then every generated token. ``decode_pages`` > 0 (``full`` and ``snapkv``): each decode
    step reads only that many cache pages per head, the ones whose key bounds promise the largest scores
    for the current query (Quest), always including the first and the newest page. Sizes a policy does not take
    are checked and written back, never used. Frozen: the policy is built once, when the plan is made.
    """

    policy: str = "full"
    sink_tokens: int = 0
    window_tokens: int = 0
    budget_tokens: int = 0
    decode_pages: int = 0

    def __post_init__(self):
        cls = policy_class(self.policy)
        for name in _KV_SIZES:
            check_int(name, getattr(self, name))
        policy = cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})  # its own rules
        object.__setattr__(self, "_policy", policy)

    def build(self) -> KVPolicy:
        """The policy this plan names, with its sizes."""
        return self._policy

    @classmethod
    def of(cls, policy: KVPolicy) -> "KVPlan":
        """The plan that builds ``policy``."""
        return cls(policy.name, **dataclasses.asdict(policy))

    @property
    def compresses(self) -> bool:
        """Whether this head keeps or reads less than the full cache."""
        return self.build().compresses

    def kept_tokens(self, n_tokens: int) -> int:
        """Prompt tokens this head holds after a prefill of ``n_tokens``."""
        return self.build().kept_tokens(n_tokens)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"policy": self.policy}
        for name in _KV_SIZES:
            if getattr(self, name):
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "KVPlan":
        """A KV plan from its JSON object; ValueError naming the field on anything else (sizes are not rounded: 0.5
        tokens is a mistake to report, not a 0)."""
        return cls(**_fields(data, "KV plan", required=("policy",), optional=_KV_SIZES))


# Plans are frozen, so derived ones are shared: a prefill-only recipe's plans are derived on every patched forward.
_shared_kv_plan = functools.lru_cache(maxsize=4096)(KVPlan)


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
                layer.append(_shared_kv_plan("window", sink_tokens=sink, window_tokens=window))
            else:
                layer.append(_shared_kv_plan("full"))
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
        }
        return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def check_model(self, config) -> None:
        """Raise RecipeError unless this recipe was made for a model of this geometry: every identity field is
        compared, not only the hash (a hand-edited description with a recomputed hash must not pass either)."""
        ident = model_identity(config)
        diffs = [f"{k}: recipe {shown(self.model.get(k))} vs model {ident[k]!r}" for k in _IDENTITY_FIELDS if self.model.get(k) != ident[k]]
        if diffs or ident["config_hash"] != self.model.get("config_hash"):
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
        _fields(data, "the recipe", required=("schema_version", "model", "block_size", "layers"),
                optional=("name", "calibration", "min_sparse_tokens", "dense_prefix_tokens"))
        model = _model_description(data["model"])
        block_size = data["block_size"]
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size {shown(block_size)} unsupported: use {', '.join(map(str, BLOCK_SIZES))}")
        min_sparse, dense_prefix = data.get("min_sparse_tokens", 0), data.get("dense_prefix_tokens", 0)
        check_int("min_sparse_tokens", min_sparse)
        check_int("dense_prefix_tokens", dense_prefix)
        name, calibration = data.get("name", ""), data.get("calibration", {})
        if not isinstance(name, str):
            raise ValueError(f"name must be a string, not {shown(name)}")
        _check_calibration(calibration, model["num_layers"])
        layers_data = data["layers"]
        if not isinstance(layers_data, list):
            raise ValueError(f"layers must be a list, not {shown(layers_data)}")
        n_layers, n_heads, n_kv = model["num_layers"], model["num_heads"], model["num_kv_heads"]
        if len(layers_data) != n_layers:
            raise ValueError(f"layer/head counts do not match its own model description: {len(layers_data)} layers, num_layers {n_layers}")
        layers, kv_layers = [], []
        for li, layer in enumerate(layers_data):
            _fields(layer, f"layer {li}", required=("heads",), optional=("kv_heads",))
            heads = layer["heads"]
            if not isinstance(heads, list) or len(heads) != n_heads:
                raise ValueError(f"layer/head counts do not match its own model description: layer {li} heads must be a list of "
                                 f"{n_heads} (num_heads), not {shown(heads) if not isinstance(heads, list) else len(heads)}")
            layers.append([_head_plan(head, f"layer {li} head {hi}") for hi, head in enumerate(heads)])
            if "kv_heads" in layer:
                kv = layer["kv_heads"]
                if not isinstance(kv, list) or len(kv) != n_kv:
                    raise ValueError(f"layer {li} kv_heads must be a list, one per KV head ({n_kv}), not {shown(kv) if not isinstance(kv, list) else len(kv)}")
                kv_layers.append([_kv_plan(plan, f"layer {li} kv head {ki}") for ki, plan in enumerate(kv)])
        if kv_layers and len(kv_layers) != len(layers):
            raise ValueError(f"kv_heads must be given for every layer, one per KV head ({n_kv}), or for none")
        return cls(
            model=model, layers=layers, block_size=block_size, calibration=calibration, name=name,
            kv_layers=kv_layers or None, min_sparse_tokens=min_sparse, dense_prefix_tokens=dense_prefix,
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


# ---- checks of the JSON data --------------------------------------------------------------------------------------
def _fields(data: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """``data`` if it is a JSON object with every ``required`` field and no unknown one (a misspelt field must not
    silently fall back to its default); ValueError saying which otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, not {shown(data)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(str(k) for k in data if k not in required and k not in optional)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {', '.join(unknown)} (known: {', '.join(required + optional)})")
    return data


def _model_description(model: Any) -> dict[str, Any]:
    """The recipe's own model description, checked on its own: positive integer sizes, query heads a multiple of
    KV heads, and the identity fields giving its stored ``config_hash`` (so a description edited for another
    model is refused here, and :meth:`Recipe.check_model` compares what the recipe was really made for)."""
    _fields(model, "model", required=(*_IDENTITY_FIELDS, "config_hash"), optional=("architecture",))
    for name in ("architecture", "model_type", "config_hash"):
        if name in model and not isinstance(model[name], str):
            raise ValueError(f"model {name} must be a string, not {shown(model[name])}")
    for name in _IDENTITY_FIELDS[1:]:  # the sizes
        check_int(f"model {name}", model[name], minimum=1)
    if model["num_heads"] % model["num_kv_heads"]:
        raise ValueError(f"model num_heads {model['num_heads']} is not a multiple of its num_kv_heads {model['num_kv_heads']}")
    if _config_hash(model) != model["config_hash"]:
        raise ValueError("model: its fields do not give its config_hash (was the description edited for another model? "
                         "a recipe is made for one model)")
    return dict(model)


def _head_plan(data: Any, where: str) -> HeadPlan:
    _fields(data, where, required=("strategy",), optional=("params", "density", "kept_mass", "output_error"))
    params = data.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ValueError(f"{where}: params must be a JSON object, not {shown(params)}")
    plan = HeadPlan(data["strategy"], dict(params), data.get("density"), data.get("kept_mass"), data.get("output_error"))
    try:
        plan.check()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return plan


def _kv_plan(data: Any, where: str) -> KVPlan:
    try:
        return KVPlan.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _check_calibration(calibration: Any, num_layers: int) -> None:
    """The calibration record is statistics for people, except ``model_windows`` (layers that keep the model's own
    sliding window, by index), which :attr:`Recipe.mean_density` reads."""
    if not isinstance(calibration, dict):
        raise ValueError(f"calibration must be a JSON object, not {shown(calibration)}")
    windows = calibration.get("model_windows", {})
    if not isinstance(windows, dict):
        raise ValueError(f"calibration model_windows must be a JSON object, not {shown(windows)}")
    for key, window in windows.items():
        if not (isinstance(key, str) and key.isascii() and key.isdecimal() and int(key) < num_layers):
            raise ValueError(f"calibration model_windows keys must be layer indices from \"0\" to \"{num_layers - 1}\", not {shown(key)}")
        check_int(f"calibration model_windows[{key!r}]", window, minimum=1)
    _check_candidates(calibration)
    _check_verified(calibration)


def _check_verified(calibration: dict) -> None:
    """The lengths a loss-bound calibration verified (``eval`` runs them by default): a list of objects, each with a
    ``length`` in tokens and whether the recipe runs ``sparse`` there."""
    verified = calibration.get("verified")
    if verified is None:
        return
    if not isinstance(verified, list):
        raise ValueError(f"calibration verified must be a list, not {shown(verified)}")
    for i, row in enumerate(verified):
        if not isinstance(row, dict) or not isinstance(row.get("sparse"), bool):
            raise ValueError(f"calibration verified[{i}] must be a JSON object with length and sparse (true/false), not {shown(row)}")
        check_int(f"calibration verified[{i}] length", row.get("length"), minimum=1)


def _check_candidates(calibration: dict) -> None:
    """The statistics ``eval --baseline uniform`` reads (:func:`patchattn.calibrate.uniform_baseline`): the sparsity
    reached and each scored candidate, whose strategy and budget the uniform twin runs."""
    for name in ("achieved_sparsity", "target_sparsity"):
        if calibration.get(name) is not None:
            check_number(f"calibration {name}", calibration[name], 0.0, 1.0, rounding=_FRACTION_ROUNDING)
    if calibration.get("seq_len") is not None:
        check_int("calibration seq_len", calibration["seq_len"], minimum=1)
    if calibration.get("objective") is not None and not isinstance(calibration["objective"], str):
        raise ValueError(f"calibration objective must be a string, not {shown(calibration['objective'])}")
    candidates = calibration.get("candidates")
    if candidates is None:
        return
    if not isinstance(candidates, list):
        raise ValueError(f"calibration candidates must be a list, not {shown(candidates)}")
    if candidates and calibration.get("achieved_sparsity") is None:
        raise ValueError("calibration candidates need calibration achieved_sparsity beside them")
    for i, cand in enumerate(candidates):
        where = f"calibration candidate {i}"
        if not isinstance(cand, dict) or not isinstance(cand.get("params"), dict) or not all(isinstance(k, str) for k in cand["params"]):
            raise ValueError(f"{where} must be a JSON object with strategy and params, not {shown(cand)}")
        try:
            get_strategy(cand.get("strategy"), **cand["params"])  # the budget the uniform twin would run
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        check_number(f"{where} mean_density", cand.get("mean_density"), 0.0, 1.0, rounding=_FRACTION_ROUNDING)
        check_number(f"{where} mean_kept_mass", cand.get("mean_kept_mass"), 0.0, 1.0, rounding=_FRACTION_ROUNDING)
        if cand.get("mean_output_error") is not None:
            check_number(f"{where} mean_output_error", cand["mean_output_error"], 0.0)
