"""KV-cache policies, each a small frozen dataclass in one registry: what one KV head of the budgeted cache keeps.

Recipes name them in their KV plans (:class:`patchattn.recipe.KVPlan`, whose ``build`` gives the policy); the cache
and calibration both call the policy's rules (see :mod:`.base`).
"""

from .base import KVPolicy, ring_slot, round_up
from .registry import POLICIES, policy_class, register

# Registered in this order, the order a recipe's error message lists them in.
from .full import Full
from .window import Window
from .snapkv import SNAPKV_POOL, SnapKV, observation_votes, snapkv_votes

__all__ = [
    "POLICIES", "SNAPKV_POOL", "Full", "KVPolicy", "SnapKV", "Window", "observation_votes", "policy_class", "register",
    "ring_slot", "round_up", "snapkv_votes",
]
