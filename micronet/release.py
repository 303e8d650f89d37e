"""Stage: export a run's checkpoint as ``model.safetensors`` + ``config.json`` (:mod:`micronet.compress.release`).

    python -m micronet.release name=<run> [step=S|best] [out=<dir>]   # default out: exports/<run>_step<S>/
    python -m micronet.release name=<run> step=best publish=<name> [n_cache=N]   # release/<name>/ + MANIFEST.json
    python -m micronet.release name=<release> withdraw=true            # remove release/<name>/ and its entry
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from micronet.compress.release import CONFIG, WEIGHTS, export_model
from micronet.runs.cli import setup_logging, stage_main
from micronet.runs.config import typed
from micronet.runs.paths import PROJECT_ROOT, release_root
from micronet.runs.results import RunDir
from micronet.stagekit.released import publish, withdraw


@dataclass
class ReleaseConfig:
    """Keys of ``conf/release.yaml``."""

    name: str = "???"
    step: int | str | None = None
    out: str | None = None  # None: exports/<name>_step<S>/ under the project root
    publish: str | None = None  # a release name: write release/<publish>/ and its MANIFEST.json entry instead
    n_cache: int = 0  # with publish: the eval cache whose searched parameters, ppl and score the release carries
    withdraw: bool = False  # remove release/<name>/ and its manifest entry instead


def run(cfg: DictConfig) -> Path:
    """The ``python -m micronet.release`` stage: export a run's checkpoint; returns the folder."""
    rc = typed(ReleaseConfig, cfg, "release")
    if rc.withdraw:
        withdraw(rc.name)
        print(f"withdrew {release_root() / rc.name} and its MANIFEST.json entry")
        return release_root() / rc.name
    rd = RunDir(rc.name).require()
    setup_logging(rd.log_path("release"))
    if rc.publish:
        entry = publish(rd.name, rc.step, rc.publish, rc.n_cache)
        print(f"{rd.name} step {entry['step']}: released as {release_root() / rc.publish} (MANIFEST.json: "
              f"test ppl {entry['test_ppl']}, ci_check ppl {entry['ci_check']['ppl']:.4f})")
        return release_root() / rc.publish
    step = rd.resolve_step(rc.step)
    step = step if step is not None else rd.latest_step()
    out = export_model(rd, step, Path(rc.out) if rc.out else PROJECT_ROOT / "exports" / f"{rd.name}_step{step}")
    print(f"{rd.name} step {step}: {out / WEIGHTS} and {out / CONFIG}")
    return out


__all__ = ["ReleaseConfig", "run"]

main = stage_main("release", run)

if __name__ == "__main__":
    main()
