"""Perplexity on the user's own texts (``patchattn eval --ppl-text FILE``), beside the shipped held-out prose.

A file is read and checked with the options (:func:`read_ppl_text`: readable UTF-8, not empty), before a model loads;
it is tokenised once per run (:func:`load_ppl_texts`, as written: no whitespace folded), and at each eval length each
variant reads the same ``ppl_windows`` windows of it, each the tokenizer's special prefix (a BOS) and then the text
from a seeded start: the file's start, or a token after a sentence end or a line break. A window never wraps around:
a text shorter than a length is not measured at that length (no rows; the results' ``ppl_texts`` entry lists those
lengths, a warning and the report say so), and a text shorter than every length is refused before any variant runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import OptionError
from ..io import unique_name
from .haystack import sentence_starts
from .tasks import _special_prefix, window_seed

logger = logging.getLogger(__name__)

PPL_TEXT_PREFIX = "ppl:"  # a text's rows have task "ppl:<name>"


def is_ppl_text_task(task: str) -> bool:
    return task.startswith(PPL_TEXT_PREFIX)


def read_ppl_text(path: str | os.PathLike) -> str:
    """The file's text (a UTF-8 byte-order mark dropped); OptionError ``ppl_texts`` when it cannot be read as UTF-8
    text or holds nothing but white space."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise OptionError("ppl_texts", f"cannot read {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise OptionError("ppl_texts", f"cannot read {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise OptionError("ppl_texts", f"{path} is empty")
    return text


@dataclass(frozen=True)
class PplText:
    """One text, tokenised. ``ids``: the whole file without special tokens; ``prefix``: what the tokenizer puts before
    text (each window starts with it); ``starts``: where a window may start (0, and after each sentence end or line
    break)."""

    name: str  # unique in the run
    path: str
    ids: list[int]
    prefix: list[int]
    starts: list[int]

    @property
    def task(self) -> str:
        return PPL_TEXT_PREFIX + self.name

    def fits(self, length_tokens: int) -> bool:
        """Whether a window of ``length_tokens`` (prefix included) fits in the text without wrapping."""
        return len(self.ids) >= length_tokens - len(self.prefix)

    def windows(self, length_tokens: int, count: int, seed: int | str = 0) -> list[list[int]]:
        """``count`` windows of ``length_tokens`` tokens, the prefix first; window w starts where a seeded choice among
        the starts that leave room puts it (windows may overlap, or coincide on a text barely longer than the length)."""
        n = length_tokens - len(self.prefix)
        room = [s for s in self.starts if s + n <= len(self.ids)]
        if not room:
            raise ValueError(f"{self.path} is {len(self.ids)} tokens, too short for a window of {length_tokens}")
        picks = [random.Random(f"patchattn-eval:ppl-text:{window_seed(seed, w)}").choice(room) for w in range(count)]
        return [self.prefix + self.ids[start : start + n] for start in picks]

    def info(self, lengths: Sequence[int]) -> dict:
        """The results' entry: ``skipped_lengths`` are the lengths longer than the text (no rows there)."""
        skipped = [n for n in lengths if not self.fits(n)]
        return {"name": self.name, "path": self.path, "tokens": len(self.ids), "skipped_lengths": skipped}


def load_ppl_texts(tokenizer, texts: Sequence[str | os.PathLike | PplText], lengths: Sequence[int]) -> list[PplText]:
    """Each text tokenised once (a PplText passes as it is), named after its file's stem (``notes``, ``notes-2`` for a
    second ``notes.txt``). OptionError ``ppl_texts`` for a text shorter than the shortest of ``lengths``; a warning
    for each length longer than a text it reads (not measured there)."""
    prefix = _special_prefix(tokenizer) if any(not isinstance(t, PplText) for t in texts) else []
    lengths = sorted(set(lengths))
    loaded: list[PplText] = []
    for text in texts:
        tokenised = not isinstance(text, PplText)
        if tokenised:
            ids = tokenizer(read_ppl_text(text), add_special_tokens=False)["input_ids"]
            starts = [0, *sentence_starts(tokenizer, ids, line_breaks=True)]
            text = PplText(Path(text).stem or "text", str(text), ids, prefix, starts)
        text = dataclasses.replace(text, name=unique_name(text.name, {t.name for t in loaded}))
        if not text.fits(lengths[0]):
            raise OptionError(
                "ppl_texts", f"{text.path} is {len(text.ids)} tokens under this tokenizer, shorter than the shortest eval "
                f"length ({lengths[0]} tokens); give a longer text or a shorter length"
            )
        skipped = text.info(lengths)["skipped_lengths"]
        if skipped and tokenised:  # warned once, where it is read
            logger.warning("%s is %d tokens long: its perplexity is not measured at %s tokens", text.path, len(text.ids),
                           ", ".join(map(str, skipped)))
        loaded.append(text)
    return loaded
