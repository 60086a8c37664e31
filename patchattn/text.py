"""Real English prose shipped with the package (public-domain State of the Union addresses).

``calibration`` (1901-1961 speeches) is the default calibration text; ``heldout`` (2001-2021 speeches) is
never used for calibration and feeds perplexity and needle haystacks in eval.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

TEXTS = ("calibration", "heldout")


@functools.lru_cache(maxsize=None)
def load_text(name: str) -> str:
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; choose one of {TEXTS}")
    with resources.files("patchattn").joinpath(f"data/{name}.txt.gz").open("rb") as fh:
        return gzip.decompress(fh.read()).decode("utf-8")
