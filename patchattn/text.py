"""Real text of several kinds shipped with the package, each in a calibration part and a held-out part.

``calibration`` (State of the Union addresses 1901-1961, public domain) is the default calibration text; ``heldout``
(2001-2021 addresses) is never used for calibration and feeds perplexity and needle haystacks in eval. Together they are
the ``prose`` kind. The other kinds (``code``, ``docs``, ``dialogue``, ``structured``) let calibration score heads on
more than prose and let eval measure on kinds that calibration never saw. The two parts of a kind share no document and
no 200-character window. ``data/TEXTS.md`` gives each kind's sources and licences; ``scripts/build_texts.py`` rebuilds them.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

PARTS = ("calibration", "heldout")

# kind -> (calibration resource, held-out resource); a resource is data/<name>.txt.gz
KINDS: dict[str, tuple[str, str]] = {
    "prose": ("calibration", "heldout"),
    "code": ("code-calibration", "code-heldout"),
    "docs": ("docs-calibration", "docs-heldout"),
    "dialogue": ("dialogue-calibration", "dialogue-heldout"),
    "structured": ("structured-calibration", "structured-heldout"),
}

TEXTS = tuple(name for pair in KINDS.values() for name in pair)


@functools.lru_cache(maxsize=None)
def load_text(name: str) -> str:
    """One shipped text by resource name (``calibration``, ``heldout``, ``code-calibration``, ...)."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose one of {TEXTS}")
    with resources.files("patchattn").joinpath(f"data/{name}.txt.gz").open("rb") as fh:
        return gzip.decompress(fh.read()).decode("utf-8")


def load_kind(kind: str, part: str) -> str:
    """The ``part`` ("calibration" or "heldout") of one kind of text; ``load_kind("prose", p)`` is ``load_text(p)``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of text {kind!r}; choose one of {tuple(KINDS)}")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose one of {PARTS}")
    return load_text(KINDS[kind][PARTS.index(part)])
