"""Reference for the fused layout finisher: :func:`patchattn.layout.finalize` then :func:`patchattn.layout.to_ragged`.

``finalize_ragged_naive(keep) -> (counts, ids, density)``: ``keep`` a raw (B, H, n, n) bool layout as a strategy
produced it; returned as the kernels consume it (causal, diagonal and last row forced in, and the first
``dense_rows`` rows; with ``window_rows`` only the blocks a sliding window reaches).
"""

from __future__ import annotations

import torch

from ...layout import finalize, to_ragged


def finalize_ragged_naive(keep: torch.Tensor, dense_rows: int = 0, window_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    return to_ragged(finalize(keep, dense_rows, window_rows))
