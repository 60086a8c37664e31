"""Atomic file writes: write to a temporary name in the target's directory, then rename.

:func:`ensure_writable_dir` records the directories it creates, so that a command that fails can take back the empty
ones (:func:`remove_created_dirs`) and one that succeeds keeps them (:func:`forget_created_dirs`).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from .cleanup import deferred_signals, temporary_paths
from .errors import OutputPathError

_created_dirs: list[Path] = []  # absolute, in the order made
_created_lock = threading.Lock()


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written into it (the probe file is removed again).
    The directories this call creates are recorded for :func:`remove_created_dirs`."""
    path = Path(path)
    missing = [p for p in (path.absolute(), *path.absolute().parents) if not p.exists()]
    try:
        with deferred_signals():
            try:
                path.mkdir(parents=True, exist_ok=True)
            finally:  # those made before a failure too
                with _created_lock:
                    _created_dirs.extend(p for p in reversed(missing) if p.is_dir() and p not in _created_dirs)
        with temporary_paths() as temp:
            fd, _ = temp.mkstemp(dir=path, prefix=".patchattn-probe-")
            os.close(fd)
    except OSError as exc:
        raise OutputPathError(f"cannot write to {path}: {exc.strerror or exc}; choose another output path") from None
    return path


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_dir_path(path: str | os.PathLike, name: str = "output") -> Path:
    """Refuse, creating nothing, a ``path`` that cannot become a directory to write into: a file, or under a file or
    an unwritable directory (``name``: what the user called it, e.g. a flag)."""
    path = Path(path)
    base = _nearest_existing(path.absolute())
    if not base.is_dir():
        where = "exists and is not a directory" if base == path.absolute() else f"is under {base}, which is not a directory"
        raise OutputPathError(f"{name} {path} {where}; choose another output path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write to {path}: {base} is not writable; choose another output path")
    return path


def check_file_path(path: str | os.PathLike, name: str = "output") -> Path:
    """Refuse, creating nothing, a ``path`` where a file cannot be written: an existing directory, a path under a file,
    an unwritable directory."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{name} {path} is a directory; name a file")
    base = _nearest_existing(path.absolute().parent)
    if not base.is_dir():
        raise OutputPathError(f"cannot write {name} {path}: {base} is not a directory; choose another output path")
    if not os.access(base, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputPathError(f"cannot write {name} {path}: permission denied; choose another output path")
    return path


def remove_created_dirs() -> list[Path]:
    """Remove the directories :func:`ensure_writable_dir` created that are still empty, deepest first, and clear the
    record: for a command that failed. Returns those removed."""
    with _created_lock:
        dirs = sorted(_created_dirs, key=lambda p: len(p.parts), reverse=True)
        _created_dirs.clear()
    removed = []
    for directory in dirs:
        try:
            directory.rmdir()  # only an empty one
            removed.append(directory)
        except OSError:
            pass
    return removed


def forget_created_dirs() -> None:
    """Clear the record of created directories, keeping them: for a command that succeeded."""
    with _created_lock:
        _created_dirs.clear()


def current_umask() -> int:
    """The process umask (read by setting and restoring it), for files and directories made with private modes."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    ensure_writable_dir(path.parent if str(path.parent) else ".")
    with temporary_paths() as temp:
        fd, tmp = temp.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file what open() would
        os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def unique_name(name: str, taken) -> str:
    """``name``, or ``name-2``, ``name-3``, ... : the first not in ``taken`` (variants, texts and kinds named after
    files)."""
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    return out
