"""The thin layer between Hydra and a stage's ``run(cfg)``: logging, one-line errors, exit codes."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from micronet.runs.allocator import tune_malloc
from micronet.runs.config import MicronetError
from micronet.runs.paths import CONF_DIR

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_file: Path | None = None) -> None:
    """Log INFO to stderr and, if given, append to ``log_file`` (the results dir's stage log)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_micronet", False):
            root.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(_LogFile(log_file, encoding="utf-8"))
        except OSError as e:  # e.g. disk full: the stage itself reports what it cannot write
            print(f"micronet: warning: cannot open the log {log_file} ({e.strerror}); logging to stderr only",
                  file=sys.stderr)
    for h in handlers:
        h.setFormatter(logging.Formatter(LOG_FORMAT))
        h._micronet = True  # type: ignore[attr-defined]
        root.addHandler(h)


class _LogFile(logging.FileHandler):
    """A stage log that, when it cannot be written (disk full), says so once instead of printing a
    traceback per record, and goes on logging to stderr only."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.broken = True
        err = sys.exc_info()[1]
        print(f"micronet: warning: cannot write the log {self.baseFilename} "
              f"({getattr(err, 'strerror', None) or err}); logging to stderr only", file=sys.stderr)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # flushing a record that never fitted on the disk
            pass


class StopSignals:
    """SIGINT/SIGTERM -> a flag (``signum``) that a stage's loop checks at a safe point, so it can
    save its progress, release its guard and exit 130/143 instead of dying mid-write."""

    def __init__(self) -> None:
        self.signum = 0

    def __enter__(self) -> "StopSignals":
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def stage_main(stage: str, run: Callable[[DictConfig], Any], config_name: str | None = None) -> Callable[[], Any]:
    """Build the ``@hydra.main`` entry point of a stage.

    User errors (:class:`MicronetError`) print one line ``micronet.<stage>: error: ...`` and exit 2;
    so do command-line errors Hydra finds before the stage runs (unknown key, bad syntax, unknown
    config option), which Hydra itself would print over several lines and exit 1.
    An interrupt that reaches here exits 130.
    """
    entered = False  # errors after this point are the stage's own

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name or stage)
    def _main(cfg: DictConfig) -> Any:
        nonlocal entered
        try:
            OmegaConf.resolve(cfg)  # a bad ${...} on the command line: a one-line error, not a traceback
        except OmegaConfBaseException as e:
            print(f"micronet.{stage}: error: {hydra_error_line(e)}", file=sys.stderr)
            sys.exit(2)
        entered = True
        try:
            return run(cfg)
        except MicronetError as e:
            print(f"micronet.{stage}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print(f"micronet.{stage}: interrupted", file=sys.stderr)
            sys.exit(130)

    def main() -> Any:
        tune_malloc()  # glibc: the tuned allocator without GLIBC_TUNABLES (micronet.runs.allocator)
        own = "HYDRA_FULL_ERROR" not in os.environ  # a user who set it wants Hydra's full report
        if own:
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises composition errors instead of printing them
        try:
            return _main()
        except (HydraException, OmegaConfBaseException) as e:
            if entered or not own:
                raise
            print(f"micronet.{stage}: error: {hydra_error_line(e)}", file=sys.stderr)
            sys.exit(2)
        finally:
            if own:
                os.environ.pop("HYDRA_FULL_ERROR", None)

    return main


def hydra_error_line(e: BaseException) -> str:
    """One line for a Hydra command-line error: an unknown key, an override syntax error, a missing option."""
    text = str(e)
    if isinstance(e.__cause__, OmegaConfBaseException) and "not in struct" in str(e.__cause__):
        key = getattr(e.__cause__, "full_key", None) or re.search(r"'([^']+)'", text).group(1)
        add = re.search(r"use (\+\S+)", text)
        return f"unknown configuration key '{key}'" + (f" (to add a new key, use {add.group(1)})" if add else "")
    parts: list[str] = []
    for line in text.split("Config search path:")[0].splitlines():
        if not line.strip():
            continue
        if line[:1].isspace() and parts:  # an indented list (e.g. available options) joins its heading
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        else:
            parts.append(line.strip())
    return "; ".join(parts) or type(e).__name__


def normalize_argv(argv: list[str]) -> list[str]:
    """Quote numeric pruning schedule names (``prune=0.358`` / ``prune=0.239,0.358``): Hydra would read
    them as floats, and a config-group choice must be a string (the prune stage's and the pipeline's)."""
    out = []
    for a in argv:
        m = re.fullmatch(r"prune=([\w.]+(?:,[\w.]+)*)", a)  # plain names only (no quotes, brackets, sweeps fns)
        out.append("prune=" + ",".join(f"'{v}'" for v in m.group(1).split(",")) if m else a)
    return out
