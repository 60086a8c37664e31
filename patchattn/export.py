"""Write and read a patched model directory.

The directory is an ordinary HuggingFace model folder (safetensors weights, tokenizer) whose config.json
also names ``attn_implementation: "patchattn"`` and carries the recipe under ``patchattn_recipe``; so
``AutoModelForCausalLM.from_pretrained(dir)`` returns the patched model once patchattn is imported.
``recipe.json`` and a short model card sit beside them. Everything is written into a temporary sibling
directory first and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputPathError, RecipeError
from .io import ensure_writable_dir, write_json_atomic, write_text_atomic
from .patch import ATTN_NAME, BACKEND_KEY, GRAPHS_KEY, ORIGINAL_KEY, RECIPE_KEY, check_supported
from .recipe import Recipe

logger = logging.getLogger(__name__)

_CARD = """# {name} — patched with patchattn

Sparse-attention version of `{source}` for long-context inference, made by
[patchattn](https://pypi.org/project/patchattn/) {version} without training.

| | |
|---|---|
| architecture | {architecture} ({num_layers} layers, {num_heads} query / {num_kv_heads} KV heads, head dim {head_dim}) |
| recipe | `{recipe_name}`, block size {block_size} |
| heads by strategy | {counts} |
| calibration | {seq_len} tokens, target sparsity {target}, achieved {achieved} |

Prefill runs each head's block layout through patchattn's sparse kernels (Triton on CUDA, PyTorch on
CPU); decoding runs dense attention.

```python
import patchattn
model, tokenizer = patchattn.load("{dirname}")
# or, with patchattn imported: AutoModelForCausalLM.from_pretrained("{dirname}")
```
"""


def _model_card(recipe: Recipe, source: str, dirname: str) -> str:
    from . import __version__

    cal = recipe.calibration
    return _CARD.format(
        name=Path(dirname).name,
        source=source,
        version=__version__,
        recipe_name=recipe.name or "recipe",
        block_size=recipe.block_size,
        counts=", ".join(f"{k}: {v}" for k, v in sorted(recipe.strategy_counts().items())),
        seq_len=cal.get("seq_len", "?"),
        target=cal.get("target_sparsity", "?"),
        achieved=cal.get("achieved_sparsity", "?"),
        dirname=dirname,
        **{k: recipe.model.get(k, "?") for k in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim")},
    )


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any model is loaded) if ``out_dir`` cannot become the export directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputPathError(f"{out_dir} exists and is not empty; choose another path or pass --overwrite")
    return ensure_writable_dir(out_dir.parent if str(out_dir.parent) else ".")


def export(model, tokenizer, recipe: Recipe, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` + ``tokenizer`` + ``recipe`` as a directory that loads back patched."""
    check_supported(model)
    recipe.check_model(model.config)
    out_dir = Path(out_dir)
    parent = check_output_dir(out_dir, overwrite)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        for key in (RECIPE_KEY, BACKEND_KEY, ORIGINAL_KEY, GRAPHS_KEY):
            config.pop(key, None)
        config["attn_implementation"] = ATTN_NAME
        config[RECIPE_KEY] = recipe.to_dict()
        write_json_atomic(config_path, config)
        recipe.save(tmp / "recipe.json")
        source = getattr(model, "patchattn_source", None) or getattr(model.config, "_name_or_path", "") or "model"
        write_text_atomic(tmp / "README.md", _model_card(recipe, source, str(out_dir)))
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported patched model to %s", out_dir)
    return out_dir


def load(path: str | os.PathLike, dtype: str = "auto", device: str = "auto", backend: str = "auto"):
    """Load an exported directory: returns ``(model, tokenizer)``, patched with its recipe."""
    from .models import load_model
    from .patch import patch

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise RecipeError(f"{path} is not a patchattn export (no config.json); make one with `patchattn export`")
    try:
        data = json.loads(config_path.read_text()).get(RECIPE_KEY)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{config_path} is not valid JSON ({exc.msg})") from None
    if data is None:
        raise RecipeError(f"{path} holds no patchattn recipe in config.json; make one with `patchattn export`")
    recipe = Recipe.from_dict(data, source=f"recipe in {config_path}")
    model, tokenizer = load_model(str(path), dtype=dtype, device=device, attn_implementation="sdpa")
    setattr(model.config, RECIPE_KEY, None)
    patch(model, recipe, backend=backend)
    return model, tokenizer
