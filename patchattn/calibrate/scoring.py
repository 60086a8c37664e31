"""Score every strategy budget on one layer's captured queries and keys.

For each head and each candidate (strategy + budget) two numbers: ``density``, the fraction of causal
blocks the candidate's layout computes (token columns as the tiles of ``block_size`` the kernels gather them in,
never more than dense: :func:`~patchattn.layout.column_reads`), and ``kept_mass``, the share of the true attention
probability that falls inside the layout, measured on sampled query rows (never the full N x N matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import block_density, column_reads, column_tiles, finalize, num_blocks
from ..strategies import Strategy


@dataclass
class LayerScores:
    density: torch.Tensor  # (H, C) float32
    kept_mass: torch.Tensor  # (H, C) float32
    output_error: torch.Tensor  # (H, C) float32: ||O_sparse - O_dense|| / ||O_dense|| on sampled rows
    # (H, C) float32: ||W_h (O_sparse - O_dense)|| / ||sum_h W_h O_dense||, the head's error after the output
    # projection as a share of the layer's whole attention output (None without the projection's weight)
    residual_error: torch.Tensor | None = None

    def utility(self, objective: str) -> torch.Tensor:
        """(H, C): what the allocation maximises under ``objective`` (:data:`.options.OBJECTIVES`): the kept mass, or
        1 - the output error, or 1 - the residual error."""
        if objective == "mass":
            return self.kept_mass
        return 1.0 - (self.output_error if objective == "output" else self.residual_error)


def sample_rows(n_tokens: int, n_rows: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """Query positions to score on: uniform over the sequence past the first block, sorted."""
    lo = min(block_size, n_tokens - 1)
    count = min(n_rows, n_tokens - lo)
    rows = torch.randperm(n_tokens - lo, generator=generator)[:count] + lo
    return rows.sort().values


def row_probs(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal attention probabilities of the sampled rows: (B, H, R, N) float32."""
    n = key.shape[2]
    scores = torch.matmul(query[:, :, rows].float(), key.float().transpose(-1, -2)) * scale
    future = torch.arange(n, device=key.device)[None, :] > rows[:, None].to(key.device)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def block_mass(probs: torch.Tensor, value: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (B, H, R, N) per key block: mass (B, H, R, nkb) and partial outputs sum_t p_t v_t (B, H, R, nkb, D)."""
    n = value.shape[2]
    n_blk = num_blocks(n, block_size)
    pad = n_blk * block_size - n
    probs = torch.nn.functional.pad(probs, (0, pad)).view(*probs.shape[:-1], n_blk, block_size)
    values = torch.nn.functional.pad(value.float(), (0, 0, 0, pad)).view(*value.shape[:2], n_blk, block_size, -1)
    partial = torch.einsum("bhrjt,bhjtd->bhrjd", probs, values)
    return probs.sum(-1), partial


CHUNK = 16  # candidates scored together (memory: CHUNK x B x H x R x key blocks floats, twice with token columns)


class _ColumnMass:
    """The sampled rows' mass and partial outputs in a candidate's token columns, per key block. The candidates of one
    vertical budget share their columns and come one after another in the grid, so only the last result is kept (the
    partial outputs are as large as the block ones: (B, H, R, n_blocks, D), gigabytes at 32K tokens and 32 heads)."""

    def __init__(self, probs: torch.Tensor, value: torch.Tensor, block_size: int):
        self.probs, self.value, self.block_size = probs, value, block_size
        self.last: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.last is not None and self.last[0].shape == cols.shape and torch.equal(self.last[0], cols):
            return self.last[1]
        self.last = None  # free the previous result before computing the next
        n = self.probs.shape[-1]
        chosen = torch.zeros(*cols.shape[:2], n + 1, dtype=self.probs.dtype, device=self.probs.device)
        chosen.scatter_(-1, cols.long().clamp(max=n), 1.0)
        result = block_mass(self.probs * chosen[:, :, None, :n], self.value, self.block_size)
        self.last = (cols, result)
        return result


class _OutputErrors:
    """Per candidate, in candidate order: the kept mass and the relative output error on the sampled rows (and, given
    the layer's output projection, the error in the residual stream), against the dense outputs.

    Candidates go in chunks that share one token-column set (or none): the partial outputs they keep are summed in
    one batched product per chunk (one (B, H, R) matrix-vector product per candidate is mostly overhead on a CPU)."""

    def __init__(self, partial_out: torch.Tensor, row_weights: torch.Tensor, out_proj: torch.Tensor | None, head_dim: int):
        n_q_heads = partial_out.shape[1]
        self.partial_out = partial_out  # (B, H, R, nkb, D)
        self.dense_out = partial_out.sum(-2)  # (B, H, R, D)
        self.dense_norm = self.dense_out.norm(dim=-1).clamp(min=1e-6)
        self.weights = row_weights.to(partial_out.device, torch.float32)[None, None, :]  # (1, 1, R)
        self.w_heads = self.layer_out = None
        if out_proj is not None and out_proj.shape[-1] == n_q_heads * head_dim:
            self.w_heads = out_proj.detach().float().view(out_proj.shape[0], n_q_heads, head_dim)  # (hidden, H, D)
            self.layer_out = torch.einsum("bhrd,ehd->bre", self.dense_out, self.w_heads).norm(dim=-1).clamp(min=1e-6)  # (B, R)
        self.masses: list[torch.Tensor] = []
        self.errors: list[torch.Tensor] = []
        self.residual: list[torch.Tensor] = []
        self.chunk: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (kept blocks (B,H,R,nkb), kept, read)
        self.chunk_cols = self.chunk_col_out = None  # the chunk's token columns and their partial outputs

    def row_mean(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weights).sum(-1).mean(0)  # (B, H, R) -> (H,)

    def start_chunk(self, cols: torch.Tensor | None) -> None:
        """Score the pending chunk first unless it reads the same token columns as ``cols`` and has room."""
        same_cols = (cols is None) == (self.chunk_cols is None) and (cols is None or torch.equal(cols, self.chunk_cols))
        if not same_cols or len(self.chunk) == CHUNK:
            self.flush()
            self.chunk_cols, self.chunk_col_out = cols, None

    def add(self, keep_rows: torch.Tensor, kept: torch.Tensor, read: torch.Tensor | None) -> None:
        self.chunk.append((keep_rows, kept, read))

    def flush(self) -> None:
        if not self.chunk:
            return
        kept_out = torch.einsum("gbhrj,bhrjd->gbhrd", torch.stack([c[0] for c in self.chunk]), self.partial_out)
        if self.chunk_col_out is not None:
            kept_out += torch.einsum("gbhrj,bhrjd->gbhrd", torch.stack([c[2] for c in self.chunk]), self.chunk_col_out)
        for (_, kept, _), out in zip(self.chunk, kept_out):
            self._finish(kept, out)
        self.chunk.clear()

    def _finish(self, kept: torch.Tensor, kept_out: torch.Tensor) -> None:
        self.masses.append(self.row_mean(kept))
        sparse_out = kept_out / kept.clamp(min=1e-12)[..., None]
        self.errors.append(self.row_mean((sparse_out - self.dense_out).norm(dim=-1) / self.dense_norm))
        if self.w_heads is not None:
            projected = torch.einsum("bhrd,ehd->bhre", sparse_out - self.dense_out, self.w_heads).norm(dim=-1)  # (B, H, R)
            self.residual.append(self.row_mean(projected / self.layer_out[:, None]))


def score_layer(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    candidates: list[Strategy],
    block_size: int,
    rows: torch.Tensor,
    scale: float | None = None,
    row_weights: torch.Tensor | None = None,
    out_proj: torch.Tensor | None = None,
    dense_rows: int = 0,
) -> LayerScores:
    """``query`` (B, Hq, N, D), ``key``/``value`` (B, Hkv, N, D) post-RoPE; candidates grouped by strategy class.
    ``row_weights`` (R,), summing to 1, weighs the rows in the means (default: equal). ``out_proj``: the layer's
    output projection weight (hidden, Hq * D), for ``residual_error``: a head whose output the projection shrinks,
    or that the other heads outweigh, matters less to the model than its own relative error says. ``dense_rows``: the
    recipe's dense prefix (query blocks read in full), part of every candidate's layout, density and mass."""
    n_q_heads, head_dim = query.shape[1], query.shape[-1]
    row_blocks = (rows // block_size).to(query.device)
    key = key.repeat_interleave(n_q_heads // key.shape[1], dim=1)
    value = value.repeat_interleave(n_q_heads // value.shape[1], dim=1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    probs = row_probs(query, key, rows, scale)
    mass_per_block, partial_out = block_mass(probs, value, block_size)
    column_mass = _ColumnMass(probs, value, block_size)
    n_blk = mass_per_block.shape[-1]
    causal_count = n_blk * (n_blk + 1) / 2
    before_row = torch.arange(n_blk, device=query.device)[None, :] < row_blocks[:, None]  # (R, nkb): before each row's own block
    if row_weights is None:
        row_weights = torch.full((rows.numel(),), 1.0 / rows.numel())
    outputs = _OutputErrors(partial_out, row_weights, out_proj, head_dim)
    densities = []
    estimates: dict[type, object] = {}
    for cand in candidates:
        est = estimates.get(type(cand))
        if est is None:
            est = estimates[type(cand)] = cand.estimate(query, key, block_size)
        keep = finalize(cand.layout(est), dense_rows)
        cols = cand.columns(est)
        if cols is not None:  # the query blocks whose columns would cost as much as dense read their blocks instead
            keep, col_counts = column_reads(keep, cols, block_size, dense_rows)
        keep_rows = keep[:, :, row_blocks, :].float()  # (B, H, R, nkb)
        kept = (mass_per_block * keep_rows).sum(-1)  # (B, H, R)
        density = block_density(keep)
        outputs.start_chunk(cols)
        read = None
        if cols is not None:  # token columns: the mass of those outside the row's blocks, before the row's block
            col_mass, outputs.chunk_col_out = column_mass(cols)
            read = (1.0 - keep_rows) * before_row
            kept = kept + (col_mass * read).sum(-1)
            density = density + column_tiles(col_counts, block_size).sum(-1) / causal_count
        densities.append(density.mean(0))
        outputs.add(keep_rows, kept, read)
    outputs.flush()
    stack = lambda xs: torch.stack(xs, -1).cpu()  # noqa: E731
    return LayerScores(stack(densities), stack(outputs.masses), stack(outputs.errors),
                       stack(outputs.residual) if outputs.residual else None)
