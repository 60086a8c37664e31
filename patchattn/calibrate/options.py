"""What ``calibrate`` is asked to do, checked in full before a model loads or a token is scored."""

from __future__ import annotations

from dataclasses import dataclass

from .. import options as check
from ..errors import OptionError
from ..layout import BLOCK_SIZES
from ..strategies import STRATEGIES
from .kv import EVAL_ROWS

DEFAULT_STRATEGIES = ("dense", "streaming", "vertical_slash", "vertical_slash_tokens", "block_topk")
# What the allocation maximises per head: the attention mass kept, 1 - the relative error of the attention
# output (which also weighs what the dropped keys' values would have contributed), or 1 - that error after the
# output projection as a share of the layer's attention output ("residual": heads weighed by what they add).
OBJECTIVES = ("mass", "output", "residual")


@dataclass(frozen=True)
class CalibrationOptions:
    """Every option of a calibration; constructing one checks them all (:class:`~patchattn.errors.OptionError`).
    ``seq_len`` is the calibration length in tokens; ``probes`` None: the default for the device."""

    target_sparsity: float = 0.85
    seq_len: int = 4096
    block_size: int = 64
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    objective: str = "output"
    n_rows: int = 256
    kv_budget: float | None = None
    decode_pages: int = 0
    decode_recall: float | None = None
    retrieval_weight: float = 0.0
    dense_prefix_tokens: int = 0
    probes: int | None = None
    min_sparse_tokens: int = 0
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "strategies", tuple(self.strategies))
        check.number("target_sparsity", self.target_sparsity, 0.0, 1.0, high_open=True)
        check.one_of("block_size", self.block_size, BLOCK_SIZES)
        check.integer("seq_len", self.seq_len, 4 * self.block_size)
        check.all_of("strategies", self.strategies, sorted(STRATEGIES))
        check.one_of("objective", self.objective, OBJECTIVES)
        check.integer("n_rows", self.n_rows, 1)
        check.integer("decode_pages", self.decode_pages, 0)
        check.number("retrieval_weight", self.retrieval_weight, 0.0, 1.0)
        check.integer("dense_prefix_tokens", self.dense_prefix_tokens, 0, self.seq_len - 1)
        check.integer("min_sparse_tokens", self.min_sparse_tokens, 0)
        check.integer("seed", self.seed)
        if self.probes is not None:
            check.integer("probes", self.probes, 0)
        if self.kv_budget is not None:
            check.number("kv_budget", self.kv_budget, 0.0, 1.0, low_open=True)
            check.integer("seq_len", self.seq_len, 8 * EVAL_ROWS)  # the KV scoring's rows need room before them
        if self.decode_recall is not None:
            check.number("decode_recall", self.decode_recall, 0.0, 1.0, low_open=True)
        if (self.decode_pages or self.decode_recall is not None) and self.kv_budget is None:
            raise OptionError("decode_pages", "and decode_recall need kv_budget (decode plans are calibrated with it)")
