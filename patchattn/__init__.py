"""patchattn: training-free sparse attention for long-context inference of HuggingFace causal LMs."""

__version__ = "0.1.0"

from .errors import PatchattnError  # noqa: E402
from .patch import patch, patched, unpatch  # noqa: E402  (importing registers the attention function)
from .recipe import Recipe  # noqa: E402


def load(path, **kwargs):
    """Load a directory written by ``patchattn export``: returns (model, tokenizer), patched."""
    from .export import load as _load

    return _load(path, **kwargs)


__all__ = ["PatchattnError", "Recipe", "load", "patch", "patched", "unpatch", "__version__"]
