"""The results-directory contract: one place that knows every file name and format.

``results/<name>/`` holds:

* ``config.yaml``           resolved configuration of the run (plus its lineage)
* ``models/model-<S>.pt``   checkpoints: magic + sha256 + torch.save payload (see :func:`save_checkpoint`)
* ``train_results.csv``     one row per validation
* ``<stage>.log``           log of every invocation
* ``eval_step<S>.json`` (``eval_step<S>_n<N>.json`` with an eval cache of N), ``score_step<S>.json``, ``cache_step<S>_n<N>.yaml``
* ``quantize_step<S>.json``, ``model.mnq``  quantized runs: summary and packed export (micronet.export)
* ``sensitivity_<target>.yaml/.png``, ``sensitivity_step<S>_curves.json``  pruning sensitivity analysis
* ``.guard``                held (flock) by the one process working on the directory

Every file is written atomically (temp file, fsync, rename), so a crash leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from micronet.config import MicronetError
from micronet.paths import PROJECT_ROOT, results_root

log = logging.getLogger(__name__)

CHECKPOINT_MAGIC = b"MICRONET"  # 8 bytes, then 32 bytes of sha256 of the payload that follows
CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=,-]*$")


class GuardError(MicronetError):
    """Another live process is working on the same results directory."""


class CheckpointError(MicronetError):
    """A checkpoint is missing, corrupt, or does not fit the requested model."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed save (ENOSPC, signal) leaves the old file intact
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


def save_checkpoint(path: Path, payload: dict) -> None:
    """Serialise ``payload`` with its checksum, atomically."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buf)
    body = buf.getvalue()
    atomic_write_bytes(path, CHECKPOINT_MAGIC + hashlib.sha256(body).digest() + body)


def load_checkpoint_file(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and verify one checkpoint file; :class:`CheckpointError` if it is damaged."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    head = len(CHECKPOINT_MAGIC)
    if raw[:head] != CHECKPOINT_MAGIC or len(raw) < head + 32:
        raise CheckpointError(f"{path} is not a micronet checkpoint (bad header)")
    digest, body = raw[head : head + 32], raw[head + 32 :]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{path} is corrupt or truncated (checksum mismatch)")
    return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)


def code_version() -> dict:
    """Git commit and dirty flag of the code that is running (None outside a checkout)."""
    try:
        import git

        repo = git.Repo(PROJECT_ROOT, search_parent_directories=False)
        return {"commit": repo.head.commit.hexsha, "dirty": repo.is_dirty(untracked_files=False)}
    except Exception:  # no git, no checkout, or no commit yet: record that we do not know
        return {"commit": None, "dirty": None}


class RunDir:
    """``results/<name>/`` and everything inside it."""

    def __init__(self, name: str, root: Path | None = None):
        if not name or not _NAME.match(str(name)):
            raise MicronetError(f"invalid run name {name!r}: use letters, digits and _ . + = , -")
        self.name = str(name)
        self.path = (root or results_root()) / self.name

    # -- file names -------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    def checkpoint_path(self, step: int) -> Path:
        return self.models_dir / f"model-{int(step)}.pt"

    def log_path(self, stage: str) -> Path:
        return self.path / f"{stage}.log"

    @property
    def train_csv(self) -> Path:
        return self.path / "train_results.csv"

    def eval_path(self, step: int, n_cache: int = 0) -> Path:
        """Perplexities of ``step``: one file per evaluation cache size (0 = no cache)."""
        suffix = f"_n{int(n_cache)}" if n_cache else ""
        return self.path / f"eval_step{int(step)}{suffix}.json"

    def score_path(self, step: int) -> Path:
        return self.path / f"score_step{int(step)}.json"

    def cache_params_path(self, step: int, n_cache: int) -> Path:
        return self.path / f"cache_step{int(step)}_n{int(n_cache)}.yaml"

    def quantize_path(self, step: int) -> Path:
        return self.path / f"quantize_step{int(step)}.json"

    @property
    def mnq_path(self) -> Path:
        return self.path / "model.mnq"

    def sensitivity_path(self, target: float, ext: str = "yaml") -> Path:
        return self.path / f"sensitivity_{float(target):g}.{ext}"

    def sensitivity_curves_path(self, step: int) -> Path:
        return self.path / f"sensitivity_step{int(step)}_curves.json"

    # -- checkpoints ------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.is_dir()

    def require(self) -> "RunDir":
        """Raise a clear error if the run does not exist."""
        if not self.exists():
            raise MicronetError(f"no results directory {self.path} (is name={self.name} right?)")
        return self

    def steps(self) -> list[int]:
        """Steps that have a checkpoint file, ascending."""
        if not self.models_dir.is_dir():
            return []
        found = (re.fullmatch(r"model-(\d+)\.pt", p.name) for p in self.models_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, step: int, payload: dict) -> Path:
        """Write ``models/model-<step>.pt`` atomically with a checksum."""
        path = self.checkpoint_path(step)
        save_checkpoint(path, {"step": int(step), **payload})
        return path

    def load(self, step: int | None = None, map_location: str | torch.device = "cpu") -> dict:
        """Load checkpoint ``step``, or the newest good one (skipping damaged files with a warning)."""
        if step is not None:
            if not self.checkpoint_path(step).exists():
                have = self.steps()
                raise CheckpointError(f"{self.name} has no checkpoint for step {step} (available: {have or 'none'})")
            return load_checkpoint_file(self.checkpoint_path(step), map_location)
        for s in reversed(self.steps()):
            try:
                return load_checkpoint_file(self.checkpoint_path(s), map_location)
            except CheckpointError as e:
                log.warning("skipping damaged checkpoint: %s", e)
        raise CheckpointError(f"{self.name} has no usable checkpoint in {self.models_dir}")

    def latest_step(self) -> int | None:
        """The newest step with a checkpoint file (not verified), or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    # -- the guard ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, stage: str) -> Iterator[None]:
        """Hold the directory for one process; clear a guard left by a dead process.

        The lock is an flock on ``.guard``: the kernel drops it when its process dies, so a
        leftover file whose lock can be taken is stale by construction (no pid guessing).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / ".guard"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_guard(path)
            os.close(fd)
            raise GuardError(
                f"results/{self.name} is in use by pid {info.get('pid', '?')} on {info.get('host', '?')} "
                f"(stage {info.get('stage', '?')}, since {info.get('since', '?')}); wait for it or stop it"
            ) from None
        stale = _read_guard(path)
        if stale:
            log.warning("cleared a guard left by a dead process: pid %s, stage %s, since %s",
                        stale.get("pid"), stale.get("stage"), stale.get("since"))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty guard file means "released cleanly"
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _read_guard(path: Path) -> dict:
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
