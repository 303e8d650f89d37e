"""Stage: export a run's checkpoint as ``model.safetensors`` + ``config.json`` (:mod:`micronet.compress.release`).

    python -m micronet.release name=<run> [step=S] [out=<dir>]        # default out: exports/<run>_step<S>/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from micronet.compress.release import CONFIG, WEIGHTS, export_model
from micronet.runs.cli import setup_logging, stage_main
from micronet.runs.config import typed
from micronet.runs.paths import PROJECT_ROOT
from micronet.runs.results import RunDir


@dataclass
class ReleaseConfig:
    """Keys of ``conf/release.yaml``."""

    name: str = "???"
    step: int | str | None = None
    out: str | None = None  # None: exports/<name>_step<S>/ under the project root


def run(cfg: DictConfig) -> Path:
    """The ``python -m micronet.release`` stage: export a run's checkpoint; returns the folder."""
    rc = typed(ReleaseConfig, cfg, "release")
    rd = RunDir(rc.name).require()
    setup_logging(rd.log_path("release"))
    step = rd.resolve_step(rc.step)
    step = step if step is not None else rd.latest_step()
    out = export_model(rd, step, Path(rc.out) if rc.out else PROJECT_ROOT / "exports" / f"{rd.name}_step{step}")
    print(f"{rd.name} step {step}: {out / WEIGHTS} and {out / CONFIG}")
    return out


__all__ = ["ReleaseConfig", "run"]

main = stage_main("release", run)

if __name__ == "__main__":
    main()
