"""Calibration: one forward pass, per-head scores for every budget, a global allocation."""

from .probe import Probe, Sensitivity, layer_sensitivity, needle_probes
from .baseline import uniform_baseline
from .capture import candidate_grid
from .run import DEFAULT_STRATEGIES, calibrate, tokens_from_text

__all__ = [
    "DEFAULT_STRATEGIES", "Probe", "Sensitivity", "calibrate", "candidate_grid", "layer_sensitivity", "needle_probes", "tokens_from_text",
    "uniform_baseline",
]
