"""Progress bars (enlighten) shared by the stages; silent when stdout is not a terminal."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import enlighten

_manager: enlighten.Manager | None = None


def manager() -> enlighten.Manager:
    """One enlighten manager per process (it owns the bottom lines of the terminal); under torchrun
    only rank 0 draws bars."""
    global _manager
    if _manager is None:
        _manager = enlighten.get_manager(enabled=os.environ.get("RANK", "0") == "0")
    return _manager


@contextlib.contextmanager
def bar(total: int | None, desc: str, unit: str, count: int = 0, status: str = "") -> Iterator[enlighten.Counter]:
    """A counter whose format shows ``status`` (update with ``counter.update(incr, status=...)``)."""
    fmt = (
        "{desc}{desc_pad}{percentage:3.0f}%|{bar}| {count:{len_total}d}/{total:d} {unit} "
        "[{elapsed}<{eta}] {status}"
        if total
        else "{desc}{desc_pad}{count:d} {unit} [{elapsed}] {status}"
    )
    counter = manager().counter(total=total, desc=desc, unit=unit, count=count, bar_format=fmt,
                                counter_format=fmt, status=status, leave=False)
    try:
        yield counter
    finally:
        counter.close(clear=True)
