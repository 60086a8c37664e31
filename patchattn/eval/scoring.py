"""How a reply to a needle prompt is scored: 1.0 when it answers, else 0.0.

Standard library only: this file is also copied beside patchattn's lm-eval task definitions (as
``patchattn_scoring.py``), so lm-eval scores a reply exactly as patchattn's own eval does, with or without
patchattn installed.

``match`` says how the expected ``answers`` are looked for in the reply:
``"any"`` the one answer appears; ``"first"`` the first answer-like item in the reply is the answer (reciting
a distractor first fails); ``"all"`` every answer appears. Numeric answers are compared with the digit runs
of the reply (thousands separators joined), others with its words.
"""

from __future__ import annotations

import re

MATCHES = ("any", "first", "all")
_NUMBER = re.compile(r"\d+")
_WORD = re.compile(r"\w+")


def numbers_in(reply: str) -> list[str]:
    """Digit runs in a reply, with thousands separators (``1,234,567``) joined."""
    return _NUMBER.findall(re.sub(r"(?<=\d)[,\u202f](?=\d{3})", "", reply))


def score_reply(reply: str, answers, match: str) -> float:
    """1.0 when ``reply`` contains ``answers`` the way ``match`` asks (see the module docstring), else 0.0."""
    answers = list(answers)
    found = numbers_in(reply) if all(a.isdigit() for a in answers) else _WORD.findall(reply)
    if match == "first":
        return float(bool(found) and found[0] == answers[0])
    if match == "all":
        return float(all(a in found for a in answers))
    if match == "any":
        return float(answers[0] in found)
    raise ValueError(f"unknown match {match!r}; one of {', '.join(MATCHES)}")
