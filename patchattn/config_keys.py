"""What a patch writes on a model's config, written and cleared here alone (by patch, unpatch, patched and export).

The recipe travels as plain data under :data:`RECIPE_KEY`, so a config saved with it (``attn_implementation:
"patchattn"``) loads back patched; beside it a patch keeps its backend, the attention implementation it replaced and
its CUDA-graph switch. The compiled form of the recipe is never on the config (it would be serialised with it):
:func:`patchattn.compiled.compiled_for` finds it from the recipe data the config holds.
"""

from __future__ import annotations

ATTN_NAME = "patchattn"  # the attention implementation (and mask builder) registered with transformers
RECIPE_KEY = "patchattn_recipe"
BACKEND_KEY = "patchattn_backend"
ORIGINAL_KEY = "patchattn_original_attn"
GRAPHS_KEY = "patchattn_cuda_graphs"
KEYS = (RECIPE_KEY, BACKEND_KEY, ORIGINAL_KEY, GRAPHS_KEY)


def recipe_data(config) -> dict | None:
    """The recipe data on a config (None: not patched)."""
    return getattr(config, RECIPE_KEY, None)


def write(config, data: dict, backend: str, cuda_graphs: bool) -> None:
    """Mark ``config`` patched with the recipe ``data``. The attention implementation it replaces is remembered by the
    first patch only (patching a patched model keeps the original)."""
    if recipe_data(config) is None:
        setattr(config, ORIGINAL_KEY, config._attn_implementation or "sdpa")
    setattr(config, RECIPE_KEY, data)
    setattr(config, BACKEND_KEY, backend)
    setattr(config, GRAPHS_KEY, cuda_graphs)


def clear(config) -> None:
    """Remove every key a patch wrote (or an exported directory's config brought)."""
    for key in KEYS:
        if hasattr(config, key):
            delattr(config, key)


def saved(config) -> dict:
    """The keys a config holds now, for :func:`restore`."""
    return {key: getattr(config, key) for key in KEYS if hasattr(config, key)}


def restore(config, keys: dict) -> None:
    """The config's keys exactly as :func:`saved` found them."""
    clear(config)
    for key, value in keys.items():
        setattr(config, key, value)


def exported(config_json: dict, data: dict) -> dict:
    """A saved config.json (as a dict) made to load back patched: the recipe ``data`` and ``attn_implementation``,
    none of a running patch's other keys."""
    config_json = {key: value for key, value in config_json.items() if key not in KEYS}
    config_json["attn_implementation"] = ATTN_NAME
    config_json[RECIPE_KEY] = data
    return config_json
