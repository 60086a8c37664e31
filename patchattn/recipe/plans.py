"""A recipe's per-head plans: :class:`HeadPlan` (a query head's prefill strategy and budget, with its calibration
statistics) and :class:`KVPlan` (what the KV cache keeps of a KV head and how the decode step reads it)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from ..checks import check_int, check_number, shown
from ..kv_policies import POLICIES, KVPolicy, policy_class
from ..strategies import Strategy, get_strategy
from .schema import FRACTION_ROUNDING, json_fields

KV_POLICIES = tuple(POLICIES)  # the KV policies' names (:mod:`patchattn.kv_policies`)
KV_SIZES = ("sink_tokens", "window_tokens", "budget_tokens", "decode_pages")


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
                check_number(name, value, 0.0, high, rounding=FRACTION_ROUNDING)

    def to_dict(self) -> dict[str, Any]:
        d = {"strategy": self.strategy, "params": dict(self.params)}
        if self.density is not None:
            d["density"] = round(float(self.density), 6)
        if self.kept_mass is not None:
            d["kept_mass"] = round(float(self.kept_mass), 6)
        if self.output_error is not None:
            d["output_error"] = round(float(self.output_error), 6)
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = "head plan") -> "HeadPlan":
        """A head plan from its JSON object, checked; ValueError starting with ``where`` on anything else."""
        json_fields(data, where, required=("strategy",), optional=("params", "density", "kept_mass", "output_error"))
        params = data.get("params", {})
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise ValueError(f"{where}: params must be a JSON object, not {shown(params)}")
        plan = cls(data["strategy"], dict(params), data.get("density"), data.get("kept_mass"), data.get("output_error"))
        try:
            plan.check()
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return plan


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
        for name in KV_SIZES:
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
        for name in KV_SIZES:
            if getattr(self, name):
                d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "KVPlan":
        """A KV plan from its JSON object; ValueError naming the field on anything else (sizes are not rounded: 0.5
        tokens is a mistake to report, not a 0)."""
        return cls(**json_fields(data, "KV plan", required=("policy",), optional=KV_SIZES))


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
