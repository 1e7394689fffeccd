"""Crash-safe file writing, shared by checkpoints and the tokenised-data caches."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(target: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``target`` through ``write(file)`` so that readers see the old file or the whole new one, never a part.

    The bytes go to a uniquely named temporary file in the same directory (``.<name>.<random>.tmp``; unique so
    that processes on nodes sharing a filesystem never collide), are flushed to disk (``fsync``), and the file
    is renamed over ``target`` with ``os.replace``, atomic on POSIX; the directory is then synced so the rename
    itself survives a crash. The file gets the mode a plain ``open()`` would give (``0o666 & ~umask``), not
    ``mkstemp``'s ``0o600``. On any error, ``KeyboardInterrupt`` included, the temporary file is removed.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with contextlib.suppress(OSError):  # some network filesystems refuse chmod: keep mkstemp's mode
            os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not possible on every platform
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
