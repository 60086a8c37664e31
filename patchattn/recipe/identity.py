"""Which model a recipe is for: the architecture and attention geometry it must match, and a hash of them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..checks import check_int, shown
from ..hf import text_config
from .schema import json_fields

IDENTITY_FIELDS = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")


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
    identity["config_hash"] = config_hash(identity)
    return identity


def config_hash(identity: dict[str, Any]) -> str:
    canonical = json.dumps({k: identity[k] for k in IDENTITY_FIELDS}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_description(model: Any) -> dict[str, Any]:
    """A recipe's own model description, checked on its own: positive integer sizes, query heads a multiple of
    KV heads, and the identity fields giving its stored ``config_hash`` (so a description edited for another
    model is refused here, and :meth:`Recipe.check_model <patchattn.recipe.Recipe.check_model>` compares what the
    recipe was really made for). ValueError saying which field otherwise."""
    json_fields(model, "model", required=(*IDENTITY_FIELDS, "config_hash"), optional=("architecture",))
    for name in ("architecture", "model_type", "config_hash"):
        if name in model and not isinstance(model[name], str):
            raise ValueError(f"model {name} must be a string, not {shown(model[name])}")
    for name in IDENTITY_FIELDS[1:]:  # the sizes
        check_int(f"model {name}", model[name], minimum=1)
    if model["num_heads"] % model["num_kv_heads"]:
        raise ValueError(f"model num_heads {model['num_heads']} is not a multiple of its num_kv_heads {model['num_kv_heads']}")
    if config_hash(model) != model["config_hash"]:
        raise ValueError("model: its fields do not give its config_hash (was the description edited for another model? "
                         "a recipe is made for one model)")
    return dict(model)
