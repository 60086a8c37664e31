"""Calibration: one forward pass, per-head scores for every budget, a global allocation."""

from .run import DEFAULT_STRATEGIES, calibrate, candidate_grid, tokens_from_text, uniform_baseline

__all__ = ["DEFAULT_STRATEGIES", "calibrate", "candidate_grid", "tokens_from_text", "uniform_baseline"]
