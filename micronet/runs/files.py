"""Atomic file writes: a reader sees the old file or the new one, never a part; an OSError becomes one line.

Every results file goes through here (:mod:`micronet.runs.results` re-exports these names).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any

from micronet.runs.config import MicronetError


class WriteError(MicronetError):
    """A results file could not be written (disk full, read-only, ...); its previous version is intact."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


def write_error(path: Path, e: OSError, doing: str = "writing") -> WriteError:
    """One clear line for an OSError met while ``doing`` ``path`` (no space, quota, read-only, ...)."""
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(
        e.errno, (e.strerror or str(e)).lower())
    return WriteError(f"{reason} while {doing} {path}", e.errno)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part.

    An OSError (ENOSPC, EROFS, ...) becomes :class:`WriteError` (one line); the temp file is removed.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # a failed save leaves the old file intact and no temp behind
        intact = f"; the previous {path.name} is intact" if path.exists() else ""
        raise WriteError(f"{write_error(path, e)}{intact}", e.errno) from e
    except BaseException:
        tmp.unlink(missing_ok=True)  # a signal mid-save: the same
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
