"""What a calibration writes into its recipe: each head's chosen plan with its scores, and the calibration record."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import torch

from .. import __version__
from ..recipe import HeadPlan
from .options import CalibrationOptions

if TYPE_CHECKING:
    from .capture import Scores


def head_plans(scores: Scores, choice: torch.Tensor) -> list[list[HeadPlan]]:
    """Each free layer's chosen candidates as plans, with their calibration scores."""
    cands, density, mass, error = scores.candidates, scores.density, scores.mass, scores.error
    return [
        [
            HeadPlan(cands[int(c)].name, cands[int(c)].params(), float(density[li, hi, c]), float(mass[li, hi, c]), float(error[li, hi, c]))
            for hi, c in enumerate(layer_choice)
        ]
        for li, layer_choice in enumerate(choice)
    ]


def calibration_stats(scores: Scores, choice: torch.Tensor, options: CalibrationOptions, text_name: str, target: float) -> dict:
    """The recipe's calibration record: what was scored, what was chosen, each candidate's means."""
    density, mass, error = (scores.pick(t, choice) for t in (scores.density, scores.mass, scores.error))
    layer_density = dict(zip(scores.free, density.mean(-1).tolist()))
    n_layers = scores.n_layers
    return {
        "patchattn_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "text": text_name,
        "seq_len": options.seq_len,
        "target_sparsity": target,
        "achieved_sparsity": round(1.0 - float(density.mean()), 6),
        "mean_kept_mass": round(float(mass.mean()), 6),
        "mean_output_error": round(float(error.mean()), 6),
        "objective": options.objective,
        "sampled_rows": scores.sampled_rows,
        "retrieval_rows": scores.retrieval_rows,
        "retrieval_weight": options.retrieval_weight if scores.retrieval_rows else 0.0,
        "strategies": list(options.strategies),
        **({"layer_strategies": list(options.layer_strategies), "layer_budgets": options.layer_budgets} if options.layer_strategies else {}),
        "layer_density": [round(float(layer_density[i]), 6) if i in layer_density else None for i in range(n_layers)],
        **({"model_windows": {str(i): w for i, w in enumerate(scores.windows) if w is not None}} if len(scores.free) < n_layers else {}),
        "candidates": [
            {
                "strategy": cand.name,
                "params": cand.params(),
                "mean_density": round(float(scores.density[..., ci].mean()), 6),
                "mean_kept_mass": round(float(scores.mass[..., ci].mean()), 6),
                "mean_output_error": round(float(scores.error[..., ci].mean()), 6),
            }
            for ci, cand in enumerate(scores.candidates)
        ],
    }
