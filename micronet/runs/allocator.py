"""glibc malloc tuning at stage start-up, so no environment variable is needed for full speed.

glibc's default malloc serves the large activation buffers of a training step with fresh ``mmap``s and
returns them to the kernel when freed, so every step page-faults them in again (~1.3-1.5x slower on
these CPUs). ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`` avoids that; so
does ``mallopt(M_MMAP_MAX, 0)`` + ``mallopt(M_TRIM_THRESHOLD, large)`` called from the process itself,
which :func:`tune_malloc` does (called by :func:`micronet.runs.cli.stage_main`, never at import time).

Skipped silently where there is no glibc (macOS, musl), when the user's own ``GLIBC_TUNABLES`` already
sets a ``glibc.malloc`` tunable (theirs wins), and when ``MICRONET_MALLOPT=0``.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest (2 GiB) a process can set itself


def tune_malloc() -> str:
    """Apply the tuning if it applies here; returns what was done (``mallopt``, or why not)."""
    if os.environ.get("MICRONET_MALLOPT", "1") == "0":
        return "off (MICRONET_MALLOPT=0)"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - AttributeError: not glibc
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the order matters not, both are plain settings.
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "mallopt" if ok else "mallopt failed"
