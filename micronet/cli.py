"""The thin layer between Hydra and a stage's ``run(cfg)``: logging, one-line errors, exit codes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from micronet.config import MicronetError
from micronet.paths import CONF_DIR

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
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(logging.Formatter(LOG_FORMAT))
        h._micronet = True  # type: ignore[attr-defined]
        root.addHandler(h)


def stage_main(stage: str, run: Callable[[DictConfig], Any], config_name: str | None = None) -> Callable[[], Any]:
    """Build the ``@hydra.main`` entry point of a stage.

    User errors (:class:`MicronetError`) print one line ``micronet.<stage>: error: ...`` and exit 2;
    an interrupt that reaches here exits 130.
    """

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name or stage)
    def _main(cfg: DictConfig) -> Any:
        try:
            return run(cfg)
        except MicronetError as e:
            print(f"micronet.{stage}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print(f"micronet.{stage}: interrupted", file=sys.stderr)
            sys.exit(130)

    return _main
