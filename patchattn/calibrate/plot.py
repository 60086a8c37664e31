"""A heat map of the chosen density per layer and head (PNG)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from ..io import write_bytes_atomic
from ..recipe import Recipe


def save_density_heatmap(recipe: Recipe, path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[h.density if h.density is not None else float("nan") for h in layer] for layer in recipe.layers]
    letters = {"dense": "D", "streaming": "S", "vertical_slash": "V", "vertical_slash_spread": "W", "vertical_slash_tokens": "C", "block_topk": "T"}
    n_layers, n_heads = len(grid), len(grid[0])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_heads + 2), max(3.0, 0.28 * n_layers + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    if n_heads * n_layers <= 1200:
        for li, layer in enumerate(recipe.layers):
            for hi, head in enumerate(layer):
                ax.text(hi, li, letters.get(head.strategy, "?"), ha="center", va="center", fontsize=6, color="white")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    cal = recipe.calibration
    ax.set_title(
        f"chosen block density ({recipe.model.get('architecture', '')}, {cal.get('seq_len', '?')} tokens, "
        f"sparsity {cal.get('achieved_sparsity', float('nan')):.2f})\n"
        + ", ".join(f"{letter} {name.replace('_', ' ')}" for name, letter in letters.items()
                    if any(h.strategy == name for layer in recipe.layers for h in layer)),
        fontsize=8,
    )
    fig.colorbar(image, ax=ax, label="density")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())
