"""Recipes: per layer, per head, which strategy and budget. Plain data, JSON with a schema version.

Schema 2 adds, per layer, a decode plan per KV head (``kv_heads``): what the KV cache keeps of that head and
how the decode step reads it. Schema 1 recipes (prefill plans only) still load; their KV plans are derived
from the prefill plans (:func:`derive_kv_plans`).

``core`` holds the :class:`Recipe` (queries, JSON, load/save), ``plans`` a head's prefill plan and a KV head's
decode plan, ``identity`` which model a recipe is for, ``schema`` the version and the checks of the JSON's other parts.
"""

from ..errors import RecipeError
from .core import Recipe
from .identity import model_identity
from .plans import KV_POLICIES, HeadPlan, KVPlan, derive_kv_plans
from .schema import READABLE_VERSIONS, SCHEMA_VERSION

__all__ = ["KV_POLICIES", "READABLE_VERSIONS", "SCHEMA_VERSION", "HeadPlan", "KVPlan", "Recipe", "RecipeError",
           "derive_kv_plans", "model_identity"]
