"""Write and read a patched model directory.

The directory is an ordinary HuggingFace model folder (safetensors weights, tokenizer) whose config.json
also names ``attn_implementation: "patchattn"`` and carries the recipe under ``patchattn_recipe``; so
``AutoModelForCausalLM.from_pretrained(dir)`` returns the patched model once patchattn is imported.
``recipe.json``, a short model card and a list of the files written (``.patchattn-export.json``: ``--overwrite`` replaces
an earlier export only, and only while it holds nothing else) sit beside them. Everything is written into a temporary
sibling directory first and renamed into place at the end; no temporary directory outlives the call.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from .cleanup import TemporaryPaths, deferred_signals, temporary_paths
from .errors import OutputPathError, RecipeError
from .io import current_umask, ensure_writable_dir, write_json_atomic, write_text_atomic
from . import config_keys
from .config_keys import RECIPE_KEY
from .patch import check_supported
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

Prefill runs each head's block layout through patchattn's sparse kernels (Triton on CUDA). Where no sparse kernel
runs (a CPU, float32) it prefills densely, since the PyTorch reference would be slower, and says so;
`patchattn.load(..., backend="sparse")` runs the layouts there too. Decoding: {decode}

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
        decode=("each KV head keeps and reads what the recipe's KV plans allow (window, SnapKV, Quest pages: "
                + ", ".join(f"{k}: {v}" for k, v in sorted(recipe.kv_policy_counts().items())) + "), through the page-sparse decode kernel."
                if recipe.compresses_kv else "the full KV cache, dense attention (the recipe keeps every token)."),
        **{k: recipe.model.get(k, "?") for k in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim")},
    )


MANIFEST = ".patchattn-export.json"  # the names an export wrote, so --overwrite knows what else is the user's
_EXPORT_FILE = re.compile(  # what exports made before the manifest wrote
    r"config\.json|generation_config\.json|recipe\.json|README\.md|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
    r"|chat_template\.(jinja|json)"
)


def _exported(entry: Path, written: set[str] | None) -> bool:
    if written is not None:
        return entry.name in written
    return entry.is_file() and _EXPORT_FILE.fullmatch(entry.name) is not None


def _not_replaceable(directory: Path, shown: Path) -> str | None:
    """Why ``--overwrite`` may not replace the non-empty ``directory`` (None: it may). Only an earlier export qualifies
    (config.json carrying the recipe), and only while it holds nothing but what that export wrote."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or RECIPE_KEY not in config:
        return (
            f"{shown} is not empty and is not an earlier patchattn export (no config.json with a patchattn recipe); "
            "--overwrite replaces only an earlier export: choose another path, or empty it yourself"
        )
    try:
        written = set(json.loads((directory / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        written = None  # an export made before the manifest
    foreign = sorted(entry.name for entry in directory.iterdir() if not _exported(entry, written))
    if foreign:
        names = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return (
            f"{shown} is an earlier patchattn export but also holds {names}, which the export did not write; "
            "move them out or choose another path (--overwrite would delete them)"
        )
    return None


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any model is loaded) if ``out_dir`` cannot become the export directory: a file, the current
    directory or one holding it, a filesystem root or mount point, or a non-empty directory that is not an earlier export
    for ``--overwrite`` to replace. Returns the directory the export is renamed into (``out_dir``'s resolved parent),
    created if missing."""
    out_dir = Path(out_dir)
    target = out_dir.resolve()
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{out_dir} exists and is not a directory; choose another output path")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputPathError(f"{out_dir} is the current directory or holds it; export into a new directory, e.g. -o patched/")
    if os.path.ismount(target):
        raise OutputPathError(f"{out_dir} is a filesystem root or mount point, which cannot be replaced; export into a new directory inside it")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OutputPathError(f"{out_dir} exists and is not empty; choose another path or pass --overwrite (it replaces an earlier export only)")
        problem = _not_replaceable(target, out_dir)
        if problem:
            raise OutputPathError(problem)
    return ensure_writable_dir(target.parent)


def _move_into_place(tmp: Path, target: Path, temp: TemporaryPaths) -> None:
    """Rename ``tmp`` to ``target``. A non-empty ``target`` (one check_output_dir let through) is first renamed into a
    registered temporary directory, which goes when the export's block ends, and put back if the second rename fails."""
    try:
        if not (target.is_dir() and any(target.iterdir())):
            os.replace(tmp, target)  # onto nothing or an empty directory
            return
        old = temp.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-")
        with deferred_signals():  # a signal between the two renames would leave neither export in place
            os.replace(target, old / target.name)
            try:
                os.replace(tmp, target)
            except OSError:
                try:
                    os.replace(old / target.name, target)
                except OSError:
                    temp.paths.remove(old)  # never delete the only copy
                    raise OutputPathError(f"cannot put the previous export back into {target}; it is in {old / target.name}") from None
                raise
    except OSError as exc:
        raise OutputPathError(f"cannot move the export into {target}: {exc.strerror or exc}; choose another output path") from None


def export(model, tokenizer, recipe: Recipe, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` + ``tokenizer`` + ``recipe`` as a directory that loads back patched. Nothing but the finished
    directory remains, whatever ends the call (SIGTERM too, once :func:`patchattn.cleanup.install_signal_handlers` ran)."""
    from . import __version__

    check_supported(model)
    recipe.check_model(model.config)
    out_dir = Path(out_dir)
    parent = check_output_dir(out_dir, overwrite)
    target = parent / out_dir.resolve().name
    with temporary_paths() as temp:
        tmp = temp.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the directory what mkdir would
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = config_keys.exported(json.loads(config_path.read_text()), recipe.to_dict())
        write_json_atomic(config_path, config)
        recipe.save(tmp / "recipe.json")
        source = getattr(model, "patchattn_source", None) or getattr(model.config, "_name_or_path", "") or "model"
        write_text_atomic(tmp / "README.md", _model_card(recipe, source, str(out_dir)))
        files = sorted({p.name for p in tmp.iterdir()} | {MANIFEST})
        write_json_atomic(tmp / MANIFEST, {"patchattn_version": __version__, "files": files})
        _move_into_place(tmp, target, temp)
    logger.info("exported patched model to %s", out_dir)
    return out_dir


def load(path: str | os.PathLike, dtype: str = "auto", device: str = "auto", backend: str | None = None):
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
    config_keys.clear(model.config)  # so that patch() records the implementation it was loaded with (sdpa)
    patch(model, recipe, backend=backend)
    return model, tokenizer
