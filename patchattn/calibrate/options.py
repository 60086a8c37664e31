"""What ``calibrate`` is asked to do, checked in full before a model loads or a token is scored."""

from __future__ import annotations

from dataclasses import dataclass

from .. import options as check
from ..errors import OptionError
from ..layout import BLOCK_SIZES
from ..strategies import STRATEGIES
from .kinds import ROBUST, VERIFY
from .kv import EVAL_ROWS
from .layer_strategies import LAYER_BUDGETS, parse_rules
from .search import LossBound
from .texts import calibration_texts

# The sparsity a calibration allocates to when asked for neither a target nor a loss bound (the library's default;
# the CLI keeps a loss bound instead, search.DEFAULT_MAX_LOSS).
DEFAULT_TARGET_SPARSITY = 0.85

# Fixed token columns (vertical_slash_tokens) are offered on request only: their heads are the ones that lose on kinds of
# text calibration never read (SmolLM2 8K: 24 of the 30 heads whose error rises most; at 2K, without them the search
# chose 44.5% and held three unseen kinds within +2%, with them 37.1%: examples/kinds-smollm2-8k/v4, v5/cpu-2k).
DEFAULT_STRATEGIES = ("dense", "streaming", "vertical_slash_spread", "block_topk")
# What the allocation maximises per head: the attention mass kept, 1 - the relative error of the attention
# output (which also weighs what the dropped keys' values would have contributed), or 1 - that error after the
# output projection as a share of the layer's attention output ("residual": heads weighed by what they add).
OBJECTIVES = ("mass", "output", "residual")


@dataclass(frozen=True)
class CalibrationOptions:
    """Every option of a calibration; constructing one checks them all (:class:`~patchattn.errors.OptionError`).
    ``seq_len`` is the calibration length in tokens; ``probes`` None: the default for the device. The sparsity is
    chosen by a fixed ``target_sparsity`` or by the sparsest recipe within ``max_loss`` (a :class:`LossBound` or its
    text, ``"ppl=2%"``), never both; with neither, :data:`DEFAULT_TARGET_SPARSITY`. ``texts`` (files, each a kind named
    by its stem) and ``kinds`` (shipped kinds, :data:`patchattn.text.KINDS`) are the texts to calibrate on, each file
    read here (:func:`~patchattn.calibrate.texts.calibration_texts`; whether it has ``seq_len`` tokens is known when the
    tokenizer is there); ``robust`` is how several kinds combine and ``verify`` what each kind's held-out text is
    measured under (:mod:`patchattn.calibrate.kinds`; ``"auto"``: unseen-kind for a loss bound on several kinds;
    an explicit ``"unseen-kind"`` needs ``max_loss``, and two kinds or more, known once the texts are)."""

    target_sparsity: float | None = None
    max_loss: LossBound | str | None = None
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
    needles: int | None = None  # the needle check's prompts (patchattn.calibrate.retrieval); None: the CLI's default
    min_sparse_tokens: int = 0
    seed: int = 0
    texts: tuple[str, ...] = ()
    kinds: tuple[str, ...] | None = None
    robust: str = "worst"
    verify: str = "auto"
    break_even: bool = True  # on a GPU, time each layer's prefill break-even (patchattn.calibrate.breakeven)
    layer_strategies: tuple[str, ...] = ()  # "A-B=name,name": those layers choose among fewer strategies (layer_strategies.py)
    layer_budgets: str = "kept"  # with layer_strategies: each rule's layers keep their density, or one budget over every head

    def __post_init__(self):
        object.__setattr__(self, "strategies", tuple(self.strategies))
        object.__setattr__(self, "texts", tuple(str(p) for p in self.texts))
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(self.kinds))
        if self.max_loss is not None:
            if self.target_sparsity is not None:
                raise OptionError("max_loss", "and target_sparsity both choose the sparsity: give one of them")
            object.__setattr__(self, "max_loss", LossBound.parse(self.max_loss))
        elif self.target_sparsity is None:
            object.__setattr__(self, "target_sparsity", DEFAULT_TARGET_SPARSITY)
        if self.target_sparsity is not None:
            check.number("target_sparsity", self.target_sparsity, 0.0, 1.0, high_open=True)
        check.one_of("block_size", self.block_size, BLOCK_SIZES)
        check.integer("seq_len", self.seq_len, 4 * self.block_size)
        check.all_of("strategies", self.strategies, sorted(STRATEGIES))
        object.__setattr__(self, "layer_strategies", tuple(self.layer_strategies))
        parse_rules(self.layer_strategies, self.strategies)
        check.one_of("layer_budgets", self.layer_budgets, LAYER_BUDGETS)
        check.one_of("objective", self.objective, OBJECTIVES)
        check.integer("n_rows", self.n_rows, 1)
        check.integer("decode_pages", self.decode_pages, 0)
        check.number("retrieval_weight", self.retrieval_weight, 0.0, 1.0)
        check.integer("dense_prefix_tokens", self.dense_prefix_tokens, 0, self.seq_len - 1)
        check.integer("min_sparse_tokens", self.min_sparse_tokens, 0)
        check.integer("seed", self.seed)
        if self.probes is not None:
            check.integer("probes", self.probes, 0)
        if self.needles is not None:
            check.integer("needles", self.needles, 0)
        if self.kv_budget is not None:
            check.number("kv_budget", self.kv_budget, 0.0, 1.0, low_open=True)
            check.integer("seq_len", self.seq_len, 8 * EVAL_ROWS)  # the KV scoring's rows need room before them
        if self.decode_recall is not None:
            check.number("decode_recall", self.decode_recall, 0.0, 1.0, low_open=True)
        if (self.decode_pages or self.decode_recall is not None) and self.kv_budget is None:
            raise OptionError("decode_pages", "and decode_recall need kv_budget (decode plans are calibrated with it)")
        check.one_of("robust", self.robust, ROBUST)
        check.one_of("verify", self.verify, VERIFY)
        if self.verify == "unseen-kind" and self.max_loss is None:
            raise OptionError("verify", "unseen-kind measures the loss bound on each kind of text, but target_sparsity fixes "
                                        "the sparsity and nothing is verified: give max_loss instead")
        calibration_texts(self.texts, self.kinds)  # every file readable, every kind known
