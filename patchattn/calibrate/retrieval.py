"""Retrieval heads: the heads a needle's answer reads from far back, kept off fixed windows.

The per-head scores come from rows sampled over ordinary text, where most heads look local: a streaming head with a
window of a few thousand tokens keeps 90-98% of their attention there. Answering a question about something said far
back is another matter. On SmolLM2 at 8K, the rows that write a needle's answer put 40-90% of some heads' attention on
the needle, thousands of tokens back; a five-kind recipe at 72% had made seven of those heads streaming (layers 7, 17,
18 and 20), and the passkey fell from 0.32 to 0.11 (100 prompts, H100; ``examples/unseen-kinds``). The same heads read
the needle whether it sits in prose, in code or in eval's repeated filler, so a needle in the calibration text finds
them (DuoAttention's retrieval heads, found here by their attention rather than by training gates).

The check: each needle prompt (:func:`~patchattn.calibrate.probe.needle_probes`, the needle at least half the prompt
back) is run once, densely, with its answer fed after the question, and every windowed candidate (:attr:`Strategy.windowed`:
streaming) is scored on the rows that write the answer, as the text's rows are (:func:`.scoring.score_layer`). A
candidate's utility is then the lower of its text score and its needle score, so a window that cuts a head off from
the needle loses to budgets that keep the whole prompt in reach (block top-k, vertical-slash; dense at decode), and a
head that never reads far back keeps its streaming budget. One forward per needle: seconds on a CPU at 2K, about
twenty at 8K.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import PatchattnError
from ..layout import num_blocks
from .capture import Scores, _out_proj, attention_scale, captured_prefill
from .probe import Probe
from .scoring import row_probs, score_layer

logger = logging.getLogger(__name__)

# Needles sit between these fractions of the calibration text: at least half the prompt back from the answer, beyond
# every window a sparse recipe would give a head.
NEEDLE_DEPTHS = (0.05, 0.4)
# A head whose answer rows put at least this share of their attention more than half the prompt back is recorded
# as a retrieval head.
REACH_SHARE = 0.1


@dataclass
class NeedleScores:
    """Per free layer (F), head (H) and windowed candidate (W, at ``columns`` of the candidate grid): the objective's
    utility on the answer rows; and per head the share of those rows' attention more than half the prompt back (the
    first block, where attention sinks, not counted)."""

    columns: list[int]
    utility: torch.Tensor  # (F, H, W)
    far_share: torch.Tensor  # (F, H)
    needles: int
    rows: int

    def apply(self, scores: Scores) -> Scores:
        """A copy of ``scores`` whose windowed candidates' utility is the lower of their text's and the needles'."""
        utility = scores.utility.clone()
        utility[..., self.columns] = torch.minimum(utility[..., self.columns], self.utility.to(utility.dtype))
        return dataclasses.replace(scores, utility=utility)

    def heads(self, free: Sequence[int]) -> list[list]:
        """``[layer, head, share]`` of every head reading at least :data:`REACH_SHARE` of its answer rows' attention
        from more than half the prompt back."""
        found = (self.far_share >= REACH_SHARE).nonzero().tolist()
        return [[free[f], h, round(float(self.far_share[f, h]), 4)] for f, h in found]

    def record(self, free: Sequence[int]) -> dict:
        return {"prompts": self.needles, "rows": self.rows, "depths": list(NEEDLE_DEPTHS), "reach_share": REACH_SHARE,
                "heads": self.heads(free)}


def windowed_columns(candidates) -> list[int]:
    return [i for i, cand in enumerate(candidates) if cand.windowed]


@torch.no_grad()
def needle_scores(model, needles: Sequence[Probe], scores: Scores, block_size: int, objective: str,
                  dense_prefix_tokens: int = 0) -> NeedleScores | None:
    """Score the windowed candidates of ``scores``' grid on the rows that write each needle's answer (None: no
    windowed candidate, or no needle)."""
    columns = windowed_columns(scores.candidates)
    if not columns or not needles:
        return None
    windowed = [scores.candidates[i] for i in columns]
    free = set(scores.free)
    per_needle: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
    prefix_rows = num_blocks(dense_prefix_tokens, block_size)
    total_rows = 0
    for probe in needles:
        prompt, answer = probe.prompt.cpu(), probe.answer.cpu()
        # after the answer one block more, so its rows are not in the last query block (which every layout keeps
        # dense); attention is causal, so what follows them changes nothing they read
        ids = torch.cat([prompt, answer, prompt[:, 1 : 1 + block_size]], 1)
        n_prompt = prompt.shape[1]
        rows = torch.arange(n_prompt - 1, n_prompt + answer.shape[1] - 1)
        total_rows += int(rows.numel())
        far = (rows - ids.shape[1] // 2).clamp(min=0)  # per row: keys before this are more than half the text back
        layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(module, query, key, value, rows=rows, far=far, layers=layers):
            layer = module.layer_idx
            if query.shape[2] != key.shape[2] or layer in layers or layer not in free:
                return
            scale = attention_scale(module, query)
            got = score_layer(query, key, value, windowed, block_size, rows, scale, out_proj=_out_proj(module),
                              dense_rows=prefix_rows)
            expanded = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            probs = row_probs(query, expanded, rows, scale)[0]  # (H, R, N)
            keys = torch.arange(probs.shape[-1], device=probs.device)[None, :]
            before = (keys >= block_size) & (keys < far[:, None].to(probs.device))  # the first block is the sinks'
            share = (probs * before).sum(-1).mean(-1).cpu()  # (H,)
            layers[layer] = (got.utility(objective), share)

        captured_prefill(model, ids, hook)
        if set(layers) != free:
            raise PatchattnError(f"the needle pass captured {len(layers)} of {len(free)} layers")
        per_needle.append(layers)
    utility = torch.stack([torch.stack([n[i][0] for i in scores.free]) for n in per_needle]).mean(0)
    share = torch.stack([torch.stack([n[i][1] for i in scores.free]) for n in per_needle]).mean(0)
    found = NeedleScores(columns, utility, share, len(needles), total_rows)
    heads = found.heads(scores.free)
    logger.info("needles: %d heads read %.0f%%+ of an answer from more than half the prompt back%s", len(heads),
                100 * REACH_SHARE, (": " + ", ".join(f"L{l}H{h} {s:.2f}" for l, h, s in heads)) if heads else "")
    return found
