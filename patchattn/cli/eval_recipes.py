"""What ``patchattn eval`` compares: the recipes given and an exported directory's own, each variant named once, and
the lengths the recipes were verified at."""

from __future__ import annotations

from pathlib import Path

from ..errors import PatchattnError
from .app import console

# eval's lengths when neither --lengths nor a recipe's verified lengths say
DEFAULT_EVAL_LENGTHS = (2048, 4096)
NOTHING_TO_COMPARE = "nothing to compare: pass --recipe (or evaluate a directory from `patchattn export`)"


def _parse_lengths(text: str) -> list[int]:
    """--lengths as integers (their range is the eval options' to check)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PatchattnError(f"--lengths must be comma-separated integers, not {text!r}") from None


def _verified_lengths(recipes: list, model: str | None) -> list[int]:
    """The lengths the loaded recipes (and an exported directory's own, read from its config before the model loads)
    were verified at and run sparse, else the defaults."""
    import json

    from ..config_keys import RECIPE_KEY
    from ..recipe import Recipe

    recipes = list(recipes)
    if _bundles_recipe(model):
        recipes.append(Recipe.from_dict(json.loads((Path(model) / "config.json").read_text())[RECIPE_KEY], source=f"recipe in {model}"))
    verified = sorted({n for r in recipes for n in r.verified_lengths()})
    if verified:
        console.print(f"[dim]lengths {', '.join(map(str, verified))}: where the recipes were verified (--lengths to choose)[/]")
    return verified or list(DEFAULT_EVAL_LENGTHS)


def _bundles_recipe(model: str | None) -> bool:
    """Whether MODEL is a directory from `patchattn export` (its config carries a recipe), read without loading it."""
    import json

    from ..config_keys import RECIPE_KEY

    config = Path(model) / "config.json" if model else None
    try:
        return config is not None and config.is_file() and RECIPE_KEY in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def _load_recipes(recipe_paths: list[Path], model: str | None) -> list:
    """The --recipe files, each named after its file; something to compare (or MODEL brings its own recipe)."""
    from ..recipe import Recipe

    recipes = [Recipe.load(p) for p in recipe_paths]
    for path, r in zip(recipe_paths, recipes):
        r.name = path.stem  # variants are named after their files
    if not recipes and not _bundles_recipe(model):
        raise PatchattnError(NOTHING_TO_COMPARE)
    return recipes


def _add_exported(lm, model: str | None, recipes: list) -> None:
    """A directory from `patchattn export`: its recipe is the first variant (dense the baseline), taken off the loaded
    model's config. Then every recipe checked against the model."""
    from .. import config_keys
    from ..recipe import Recipe

    exported = config_keys.recipe_data(lm.config)
    if exported is not None:
        bundled = Recipe.from_dict(exported, source=f"recipe in {model}")
        bundled.name = bundled.name or "exported"
        recipes.insert(0, bundled)
        config_keys.clear(lm.config)
    if not recipes:
        raise PatchattnError(NOTHING_TO_COMPARE)
    for r in recipes:
        r.check_model(lm.config)


def _variants(recipes: list, baseline: str | None) -> dict:
    """Dense, then each recipe (and with --baseline uniform its uniform twin), under names that do not repeat."""
    from ..calibrate import uniform_baseline
    from ..io import unique_name

    variants: dict = {"dense": None}
    for r in recipes:
        variants[unique_name(r.name or "patched", variants)] = r
        if baseline == "uniform":
            variants[unique_name(f"{r.name or 'patched'}-uniform", variants)] = uniform_baseline(r)
    return variants
