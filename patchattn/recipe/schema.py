"""The recipe JSON's schema version and the checks of its hand-editable parts that are not plans: the field sets
of an object and the calibration record. Each check raises ValueError saying where; :meth:`Recipe.from_dict
<patchattn.recipe.Recipe.from_dict>` turns it into a RecipeError."""

from __future__ import annotations

from typing import Any

from ..checks import check_int, check_number, shown
from ..strategies import get_strategy

SCHEMA_VERSION = 3  # 3: a layer may name its own min_sparse_tokens (the device's break-even); recipes without one are
# still written as 2, which older patchattn reads
READABLE_VERSIONS = (1, 2, 3)
# Calibration writes float32 statistics rounded to 6 places: a fraction of the whole may land a hair above 1.
FRACTION_ROUNDING = 1e-3


def json_fields(data: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
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


def check_calibration(calibration: Any, num_layers: int) -> None:
    """The calibration record is statistics for people, except ``model_windows`` (layers that keep the model's own
    sliding window, by index), which :attr:`Recipe.mean_density <patchattn.recipe.Recipe.mean_density>` reads."""
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
            check_number(f"calibration {name}", calibration[name], 0.0, 1.0, rounding=FRACTION_ROUNDING)
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
        check_number(f"{where} mean_density", cand.get("mean_density"), 0.0, 1.0, rounding=FRACTION_ROUNDING)
        check_number(f"{where} mean_kept_mass", cand.get("mean_kept_mass"), 0.0, 1.0, rounding=FRACTION_ROUNDING)
        if cand.get("mean_output_error") is not None:
            check_number(f"{where} mean_output_error", cand["mean_output_error"], 0.0)
