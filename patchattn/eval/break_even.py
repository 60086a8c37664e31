"""The prefill break-even of a recipe on the GPU that times it, fitted by ``patchattn eval`` when the recipe lacks one.

A recipe calibrated on a CPU (or on another GPU) holds no break-even for the device its speed is measured on, and then
every layer prefills sparsely at every length: on a small model the layouts cost more than they save below some
16K tokens, and the speed rows would show a loss that calibration on this device would not have let happen. Before
the speed rows, such a recipe gets the break-even calibration would have given it
(:func:`patchattn.calibrate.breakeven.fit_break_even`, at the longest eval length, its half and its quarter, on the
eval's own held-out prose), said in one log line; the speed rows run that copy and the report records what was fitted.
The quality rows run the recipe as given (their backend ignores the break-even).
"""

from __future__ import annotations

import logging

import torch

from ..calibrate.breakeven import break_even_lengths, fit_break_even
from ..recipe import Recipe

logger = logging.getLogger(__name__)


def fitted_on(recipe: Recipe) -> str | None:
    """The device the recipe's break-even was timed on (None: it has none). A fit where every layer pays at every
    length leaves no per-layer thresholds, but its record still names the device."""
    return (recipe.calibration or {}).get("break_even", {}).get("device")


def for_speed(model, recipe: Recipe, input_ids: list[int], here: str | None = None, **fit) -> tuple[Recipe, dict | None]:
    """``recipe`` as the speed rows run it on ``model``'s device: itself when the device is not a GPU or the recipe's
    break-even was timed on this GPU, else a copy with one fitted on ``input_ids`` (returned with what was fitted).
    ``here``: the device's name (default: the model's GPU's; naming one fits on any device); ``fit``: passed to
    :func:`~patchattn.calibrate.breakeven.fit_break_even` (its ``timer``)."""
    device = model.get_input_embeddings().weight.device
    if here is None and device.type != "cuda":
        return recipe, None
    here = here or torch.cuda.get_device_name(device)
    before = fitted_on(recipe)
    if before == here:
        return recipe, None
    lengths = break_even_lengths(len(input_ids))
    if not lengths:
        return recipe, None
    copy = Recipe.from_dict(recipe.to_dict())
    copy.calibration = dict(copy.calibration or {})
    logger.warning("patchattn eval: recipe %s has no prefill break-even for %s (%s): timing each layer at %s tokens, as "
                   "calibrate does on a GPU, so the speed rows prefill densely where sparsity would lose",
                   recipe.name or "(unnamed)", here, f"timed on {before}" if before else "calibrated without one",
                   ", ".join(map(str, lengths)))
    ids = torch.tensor([input_ids], device=device)
    record = fit_break_even(model, copy, ids, lengths, **fit)
    record.update(device=here, fitted_by="eval")
    copy.calibration["break_even"] = record
    return copy, {"device": here, "lengths": lengths, "layer_min_tokens": copy.layer_min_tokens}
