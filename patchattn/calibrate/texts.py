"""Where a calibration's texts come from: the user's files and the shipped kinds, each a kind of its own.

A file's first ``seq_len`` tokens are scored and what follows is held out for verification
(:func:`~patchattn.calibrate.verify.split_text`); a shipped kind's calibration part likewise. A shipped kind's own
held-out part (:mod:`patchattn.text`) is never read by calibration: it is what ``eval`` measures on (the prose kind's is
eval's perplexity text), so verifying on it would tune the recipe on the test. Files are read when the options are checked, before a model loads; whether each is
``seq_len`` tokens long is known once the tokenizer is there (:func:`tokenize_texts`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import options as check
from ..errors import OptionError
from ..io import unique_name
from ..text import KINDS, load_kind
from .verify import split_text


@dataclass(frozen=True)
class CalibrationText:
    """One kind of text: ``text``'s first ``seq_len`` tokens are scored, what follows verifies."""

    kind: str  # the name the recipe records it under (unique in a calibration)
    source: str  # where it comes from, for the recipe
    text: str
    shipped: bool = False  # a shipped kind (recorded as a kind even alone)


def read_text_file(path: str | os.PathLike) -> str:
    """A calibration file's text; OptionError ``texts`` when it cannot be read as UTF-8 text or is blank."""
    from ..eval.ppl_texts import read_ppl_text  # the same checks as eval's --ppl-text

    try:
        return read_ppl_text(path)
    except OptionError as exc:
        raise OptionError("texts", exc.problem) from None


def calibration_texts(paths: Sequence[str | os.PathLike] = (), kinds: Sequence[str] | None = None) -> list[CalibrationText]:
    """Each file (a kind named by its stem; ``notes-2`` for a second ``notes``) then each shipped kind. OptionError
    ``texts`` for a file that cannot be read, ``kinds`` for none (``kinds`` given but empty), an unknown kind or one
    named twice."""
    if kinds is not None:
        check.all_of("kinds", kinds, KINDS)
    kinds = list(kinds or ())
    texts: list[CalibrationText] = []
    for path in paths:
        name = unique_name(Path(path).stem or "text", {t.kind for t in texts} | set(kinds))
        texts.append(CalibrationText(name, str(path), read_text_file(path)))
    for kind in kinds:
        if kinds.count(kind) > 1:
            raise OptionError("kinds", f"names {kind} twice; name each kind once")
        resources = KINDS[kind]
        texts.append(CalibrationText(kind, f"patchattn:{resources[0]}", load_kind(kind, "calibration"), shipped=True))
    return texts


def tokenize_texts(tokenizer, texts: Sequence[CalibrationText], seq_len: int, limit: int | None = None):
    """``calibrate``'s ``(input_ids, held_out, text_name)`` for ``texts``: for one file (or the default text) its first
    ``seq_len`` tokens (1, seq_len), the rest held out, and its source; for several texts or a shipped kind, dicts by
    kind of each. ``limit``: the model's context. OptionError ``seq_len`` naming a text with fewer tokens."""
    input_ids, held_out = {}, {}
    for t in texts:
        input_ids[t.kind], held_out[t.kind] = split_text(tokenizer, t.text, seq_len, limit, name=t.source)
    if len(texts) == 1 and not texts[0].shipped:  # one text, scored and held out as always: no kinds
        return input_ids[texts[0].kind], held_out[texts[0].kind], texts[0].source
    return input_ids, held_out, {t.kind: t.source for t in texts}
