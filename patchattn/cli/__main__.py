"""``python -m patchattn.cli``: the ``patchattn`` command."""

import sys

from . import app

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
