"""The results-directory contract: one place that knows every file name and format.

``results/<name>/`` holds:

* ``config.yaml``           resolved configuration of the run (plus its lineage)
* ``models/model-<S>.pt``   checkpoints: magic + sha256 + torch.save payload (see :func:`save_checkpoint`)
* ``train_results.csv``     one row per validation (appended; a torn last row is dropped on resume)
* ``<stage>.log``           log of every invocation
* ``eval_step<S>.json`` (``eval_step<S>_n<N>.json`` with an eval cache of N), ``score_step<S>.json``, ``cache_step<S>_n<N>.yaml``
* ``quantize_step<S>.json``, ``packed.safetensors``  quantized runs: summary and packed export
  (micronet.compress.export; runs quantized before it hold a legacy ``model.mnq``, micronet.compress.mnq)
* ``tb/``                   TensorBoard event files of ``train.tensorboard=true`` runs (micronet.training.tb_log)
* ``sensitivity_<target>.yaml/.png``, ``sensitivity_step<S>_curves.json``  pruning sensitivity analysis
* ``.guard``                held (flock) by the one process working on the directory

Every file is written atomically (temp file, fsync, rename), so a crash leaves either the
old file or the new one, never half of one; a failed write (disk full, ...) is one clear
:class:`WriteError` line and leaves no temp file. Logs and ``train_results.csv`` are appended.
"""

from __future__ import annotations

import contextlib
import csv
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
from typing import Iterator

import torch
import yaml

from micronet.runs.config import MicronetError
from micronet.runs.files import WriteError, atomic_write_bytes, atomic_write_text, write_error, write_json  # noqa: F401
from micronet.runs.paths import PROJECT_ROOT, results_root

log = logging.getLogger(__name__)

CHECKPOINT_MAGIC = b"MICRONET"  # 8 bytes, then 32 bytes of sha256 of the payload that follows
CHECKPOINT_FORMAT = 1
# config.yaml keys that record the run itself rather than its settings (a pipeline's plan leaves them out)
RUN_RECORDS = ("code", "corpus")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=,-]*$")
# Temp names (atomic_write_bytes) of files written only under the guard: train/prune/quantize, soft labels.
_GUARDED_TEMPS = (".config.yaml.tmp*", ".train_results.csv.tmp*", "models/.model-*.pt.tmp*", "soft_labels/*/.*.tmp*")


class GuardError(MicronetError):
    """Another live process is working on the same results directory."""


class CheckpointError(MicronetError):
    """A checkpoint is missing, corrupt, or does not fit the requested model."""


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


CSV_FIELDS = ["step", "tokens", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s", "elapsed_s"]


def append_csv_row(run: RunDir, row: dict) -> None:
    """Append one validation row to ``train_results.csv`` (rows past the resumed step were dropped).

    An append, not an atomic rewrite: a crash mid-write leaves at most a torn last line, which
    :func:`truncate_csv` drops when the run resumes.
    """
    new = not run.train_csv.exists()
    try:
        with open(run.train_csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: row[k] for k in CSV_FIELDS})
    except OSError as e:
        raise write_error(run.train_csv, e, "appending to") from e


def truncate_csv(run: RunDir, step: int) -> None:
    """Drop rows logged after ``step`` (a future the resumed run will redo) and any torn or damaged row."""
    if not run.train_csv.exists():
        return
    raw = text = run.train_csv.read_text(encoding="utf-8", errors="replace")
    if not text.endswith("\n"):  # a torn last line: the process died mid-append
        text = text[: text.rfind("\n") + 1]
    rows = []
    for r in csv.DictReader(io.StringIO(text, newline="")):
        try:
            if None not in r and all(r.get(k) is not None for k in CSV_FIELDS) and int(r["step"]) <= step:
                rows.append(r)
        except ValueError:
            continue
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=CSV_FIELDS)  # the same dialect (line ends) as append_csv_row
    w.writeheader()
    w.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    if out.getvalue() != raw:
        atomic_write_text(run.train_csv, out.getvalue())


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
    def packed_path(self) -> Path:
        return self.path / "packed.safetensors"

    @property
    def mnq_path(self) -> Path:
        """The legacy packed export of runs quantized before ``packed.safetensors``."""
        return self.path / "model.mnq"

    @property
    def export_path(self) -> Path:
        """This quantized run's packed export: ``packed.safetensors``, else a legacy ``model.mnq`` if present."""
        return self.mnq_path if not self.packed_path.exists() and self.mnq_path.exists() else self.packed_path

    @property
    def tb_dir(self) -> Path:
        return self.path / "tb"

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
        """Write ``models/model-<step>.pt`` atomically with a checksum.

        A failed write (disk full, ...) raises :class:`CheckpointError` naming the newest checkpoint
        still on disk, so the user knows what a re-run will resume from.
        """
        path = self.checkpoint_path(step)
        try:
            save_checkpoint(path, {"step": int(step), **payload})
        except WriteError as e:
            older = [s for s in self.steps() if s != int(step)]
            prev = f"the previous checkpoint {self.checkpoint_path(older[-1])} is intact" if older else \
                "no earlier checkpoint exists"
            raise CheckpointError(f"{str(e).split('; the previous')[0]}; {prev}") from e
        return path

    def best_step(self) -> int:
        """The checkpointed step with the lowest validation ppl in ``train_results.csv`` (the run's own
        validation: what the recipe chooses on; test perplexity never chooses)."""
        have = set(self.steps())
        rows = []
        if self.train_csv.exists():
            for r in csv.DictReader(io.StringIO(self.train_csv.read_text(encoding="utf-8", errors="replace"))):
                try:
                    rows.append((float(r["val_ppl"]), int(r["step"])))
                except (KeyError, TypeError, ValueError):
                    continue  # a torn or foreign row
        kept = [(ppl, s) for ppl, s in rows if s in have]
        if not kept and len(have) == 1 and self._released(next(iter(have))):
            return next(iter(have))  # a released model (published at its best step) rebuilt without its log
        if not kept:
            raise CheckpointError(f"step=best: {self.name} has no validation row for a kept checkpoint "
                                  f"({self.train_csv.name}: {len(rows)} rows; checkpoints: {sorted(have) or 'none'})")
        return min(kept)[1]

    def _released(self, step: int) -> bool:
        """Whether checkpoint ``step`` was rebuilt from a released model (a damaged file: no)."""
        try:
            return bool(load_checkpoint_file(self.checkpoint_path(step)).get("released"))
        except CheckpointError:
            return False

    def resolve_step(self, step: int | str | None) -> int | None:
        """A config's ``step``: an int (or its digits), ``best`` (:meth:`best_step`), ``latest`` or None
        (the newest checkpoint: None, which :meth:`load` resolves to the newest *good* one)."""
        if step is None or isinstance(step, int):
            return step
        if isinstance(step, str) and step.strip().isdigit():
            return int(step)
        if step == "best":
            return self.best_step()
        if step == "latest":
            return None
        raise CheckpointError(f"step must be a step number, best or latest, got {step!r}")

    def load(self, step: int | str | None = None, map_location: str | torch.device = "cpu") -> dict:
        """Load checkpoint ``step`` (see :meth:`resolve_step`), or the newest good one (skipping damaged
        files with a warning)."""
        step = self.resolve_step(step)
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
        hint = ""
        if not self.steps() and (PROJECT_ROOT / "conf" / "experiment" / f"{self.name}.yaml").is_file():
            # committed results without weights (e.g. a withdrawn release): say how to make them
            hint = f"; train it with python -m micronet.train experiment={self.name}"
        raise CheckpointError(f"{self.name} has no usable checkpoint in {self.models_dir}{hint}")

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
        path = self.path / ".guard"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only, no permission, no inode left
            raise write_error(path, e) from e
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
        self._remove_dead_temps()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as e:  # a full disk: fail before any work, with the guard released
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)
            raise write_error(path, e) from e
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty guard file means "released cleanly"
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _remove_dead_temps(self) -> None:
        """Delete temp files a killed guard holder left (see :func:`atomic_write_bytes`): only guard
        holders write these files, so while we hold the guard nobody else is writing them."""
        for pattern in _GUARDED_TEMPS:
            for tmp in self.path.glob(pattern):
                with contextlib.suppress(OSError):
                    size = tmp.stat().st_size
                    tmp.unlink()
                    log.warning("removed %s (%s bytes), half-written by a killed process", tmp, f"{size:,}")

    def read_config(self) -> dict | None:
        """``config.yaml`` as a dict (None if there is none); a clear error if it is damaged."""
        if not self.config_path.exists():
            return None
        try:
            raw = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            mark = getattr(e, "problem_mark", None)
            what = f"{e.problem} at line {mark.line + 1}" if mark is not None and getattr(e, "problem", None) \
                else (str(e).splitlines() or [type(e).__name__])[0]
            raise MicronetError(f"{self.config_path} is damaged ({what}); restore or remove it") from None
        if raw is not None and not isinstance(raw, dict):
            raise MicronetError(f"{self.config_path} is damaged (not a mapping); restore or remove it")
        return raw or {}


def searched_caches(run: RunDir, step: int) -> list[int]:
    """Cache sizes searched for ``step`` of ``run`` (its ``cache_step<S>_n<N>.yaml`` files), ascending."""
    return sorted(int(p.stem.rsplit("_n", 1)[1]) for p in run.path.glob(f"cache_step{int(step)}_n*.yaml"))


def _read_guard(path: Path) -> dict:
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
