"""The uniform-budget twin of a calibrated recipe: the same strategy and budget on every head, at its sparsity."""

from __future__ import annotations

from ..errors import PatchattnError
from ..recipe import HeadPlan, Recipe


def uniform_baseline(recipe: Recipe, tolerance: float = 0.02) -> Recipe:
    """The same strategy and budget on every head, at (about) the calibrated recipe's sparsity.

    From the calibration's per-candidate averages: among candidates whose mean density is within
    ``tolerance`` of the calibrated recipe's, the one keeping the most mass (else the nearest in density).
    """
    cands = recipe.calibration.get("candidates")
    if not cands:
        raise PatchattnError("this recipe has no calibration statistics; a uniform baseline needs a calibrated recipe")
    target = 1.0 - recipe.calibration["achieved_sparsity"]
    near = [c for c in cands if abs(c["mean_density"] - target) <= tolerance and c["strategy"] != "dense"]
    objective = recipe.calibration.get("objective", "mass")
    score = (lambda c: c["mean_kept_mass"]) if objective == "mass" else (lambda c: -c.get("mean_output_error", 0.0))
    best = max(near, key=score) if near else min(cands, key=lambda c: abs(c["mean_density"] - target))
    windowed = {int(i) for i in recipe.calibration.get("model_windows", {})}  # layers that keep the model's window
    layers = [
        [HeadPlan("dense") if li in windowed else HeadPlan(best["strategy"], dict(best["params"])) for _ in layer]
        for li, layer in enumerate(recipe.layers)
    ]
    calibration = {
        "baseline_of": recipe.name,
        **({"model_windows": recipe.calibration["model_windows"]} if windowed else {}),
        "seq_len": recipe.calibration.get("seq_len"),
        "achieved_sparsity": round(1.0 - best["mean_density"], 6),
        "mean_kept_mass": best["mean_kept_mass"],
        "mean_output_error": best.get("mean_output_error"),
    }
    return Recipe(
        model=dict(recipe.model), layers=layers, block_size=recipe.block_size, calibration=calibration, name="uniform",
        min_sparse_tokens=recipe.min_sparse_tokens, dense_prefix_tokens=recipe.dense_prefix_tokens,
    )
