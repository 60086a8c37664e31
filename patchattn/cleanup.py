"""Temporary files and directories that are gone on every exit, a termination signal included.

A killed process runs no ``finally``: by default SIGTERM ends Python at once, leaving the hidden temporary directories
of an export or a GGUF conversion behind. :func:`install_signal_handlers` (the ``patchattn`` command calls it first;
a script may too) turns SIGTERM and SIGHUP into a :class:`Terminated` exception in the main thread, so the stack
unwinds and :func:`temporary_paths` removes what it registered. Importing patchattn installs nothing.

Inside :func:`deferred_signals` a signal is held back until the block ends, so creating and registering a path, or
swapping two directories, is never cut in half.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM or SIGHUP once :func:`install_signal_handlers` ran. A KeyboardInterrupt, so
    whatever handles Ctrl-C (saving finished results, one "interrupted" line) handles it too; ``exit_code`` is the
    shell's 128 + signal number."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


_state = threading.local()  # signals run their handlers in the main thread only; the depth is that thread's
_pending: list[int] = []


def _raise_for(signum: int):
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


def _handler(signum, frame):
    if getattr(_state, "depth", 0):
        _pending.append(signum)
        return
    _raise_for(signum)


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP raise :class:`Terminated`, and SIGINT KeyboardInterrupt (as Python does), in the main
    thread, each held back inside :func:`deferred_signals`. A signal whose handler is not the default one (SIG_IGN under
    ``nohup``, a caller's own) is left alone. Call it once, from the main thread, at the start of a command."""
    for signum in (signal.SIGINT, *TERMINATING_SIGNALS):
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, signal.default_int_handler, _handler):
            signal.signal(signum, _handler)


@contextlib.contextmanager
def deferred_signals():
    """Hold back the signals :func:`install_signal_handlers` handles until the block ends, then raise for the first."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        if not _state.depth and _pending and threading.current_thread() is threading.main_thread():
            signum = _pending[0]
            _pending.clear()
            _raise_for(signum)


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree; a path already gone is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not remove the temporary %s: %s", path, exc)


class TemporaryPaths:
    """Paths made by :meth:`mkdtemp` / :meth:`mkstemp` or named with :meth:`add`; those still there when the
    :func:`temporary_paths` block ends are removed. One renamed into place is no longer there, so it stays."""

    def __init__(self):
        self.paths: list[Path] = []

    def add(self, path: str | os.PathLike) -> Path:
        self.paths.append(Path(path))
        return self.paths[-1]

    def mkdtemp(self, dir: str | os.PathLike, prefix: str) -> Path:
        with deferred_signals():
            return self.add(tempfile.mkdtemp(dir=dir, prefix=prefix))

    def mkstemp(self, dir: str | os.PathLike, prefix: str, suffix: str = "") -> tuple[int, Path]:
        with deferred_signals():
            fd, name = tempfile.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
            return fd, self.add(name)

    def remove_all(self) -> None:
        with deferred_signals():
            for path in reversed(self.paths):
                if os.path.lexists(path):
                    remove_path(path)
            self.paths.clear()


@contextlib.contextmanager
def temporary_paths():
    """``with temporary_paths() as temp: tmp = temp.mkdtemp(dir=..., prefix=...)``: whatever the block leaves of the
    registered paths is removed on every exit, by an exception, a :class:`Terminated` or KeyboardInterrupt included."""
    temp = TemporaryPaths()
    try:
        yield temp
    finally:
        temp.remove_all()
