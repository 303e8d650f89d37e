"""Soft labels: a teacher's top-k next-word distribution for every training token, on disk.

:func:`generate_soft_labels` writes them (the soft-labels stage, :mod:`micronet.soft_labels`);
:mod:`micronet.training.distill` reads them. The teacher runs over the train split exactly like
:func:`micronet.model.evaluation.evaluate_stream`:
batch 1, online, keys/values carried (detached) from chunk to chunk, no cache. (The original
dropped the memory between chunks, so every chunk started blind; ours carries it.)

Layout, ``results/<teacher>/soft_labels/top<k>_step<S>/``:

* ``ids.npy``    (N, k) int32    word ids, most probable first
* ``probs.npy``  (N, k) float16  their probabilities under the full distribution (not renormalised)
* ``manifest.json``  teacher, step, k, N, data fingerprint, ``rows_done``, ``complete``
* ``state.pt``   carried memory at ``rows_done`` (only while incomplete; enables exact resume)

N is the number of train tokens and **row r belongs to train token r**: it holds
top-k of p(. | tokens < r). Row 0 has no context at all, so it is stored as ids 0 and probs 0;
its probabilities sum to 0 and the distillation loss skips such rows (training never reads it
anyway: targets start at token 1). 6 bytes per entry, 180 bytes per token at k = 30.

Resume: arrays are flushed every ``block_tokens`` (and on SIGINT/SIGTERM) at a chunk boundary,
then the carried memory is saved, then the manifest. A restart continues from ``rows_done``
with that memory on the same chunk grid, so the files equal those of an uninterrupted run
bit for bit (re-running the preceding tokens would only match up to rounding).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from micronet.data.corpus import Corpus
from micronet.model.transformer import Memory
from micronet.runs.cli import StopSignals
from micronet.runs.config import ConfigError, MicronetError
from micronet.runs.progress import bar
from micronet.runs.results import RunDir, atomic_write_bytes, code_version, write_error, write_json

log = logging.getLogger(__name__)

FORMAT = 1
IDS_DTYPE, PROBS_DTYPE = np.dtype(np.int32), np.dtype(np.float16)
ROW_MEANING = ("row r: teacher top-k of p(. | train tokens < r) for train token r; "
               "row 0 (no context) is all zeros and skipped by the loss")
_DATA_KEYS = ("train_sha256", "train_tokens", "vocab_size", "vocab_sha256")  # must match the student's


class SoftLabelError(MicronetError):
    """Soft labels are missing, incomplete, damaged or do not fit the data/run asking for them."""


def data_fingerprint(corpus: Corpus) -> dict:
    """What ties soft labels to a corpus: train file hash, token count and the exact vocabulary."""
    files = corpus.manifest.get("files", {})
    return {
        "name": corpus.manifest.get("name"),
        "train_sha256": files.get("train", {}).get("sha256"),
        "train_tokens": int(len(corpus.train)),
        "vocab_size": corpus.vocab_size,
        "vocab_sha256": hashlib.sha256("\n".join(corpus.vocab).encode("utf-8")).hexdigest(),
    }


def check_data(manifest: dict, corpus: Corpus, where: str) -> None:
    """Raise :class:`SoftLabelError` if soft labels were made from other data than ``corpus``."""
    theirs, ours = manifest.get("data", {}), data_fingerprint(corpus)
    bad = [f"{k} {theirs.get(k)!r} != {ours[k]!r}" for k in _DATA_KEYS if theirs.get(k) != ours[k]]
    if bad:
        raise SoftLabelError(
            f"{where} were made from other data (data {theirs.get('name')!r}, this run: {ours['name']!r}): "
            f"{'; '.join(bad)}; train on the teacher's data set or regenerate the soft labels")


def soft_label_dir(run: RunDir, topk: int, step: int) -> Path:
    """``results/<teacher>/soft_labels/top<k>_step<S>``."""
    return run.path / "soft_labels" / f"top{int(topk)}_step{int(step)}"


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a soft-label directory, or None if it has none (or an unreadable one)."""
    try:
        return json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def auto_row_block(vocab_size: int, budget_bytes: int = 8 << 20) -> int:
    """Rows of full fp32 log-probs that fit in ``budget_bytes`` (at least 16).

    Bounds memory at any vocabulary, and small blocks stay in cache: log_probs + top-k of the
    WikiText-2 teacher took 1.3 s per 4032 rows in blocks of 64 rows against 4.1 s in blocks of 504.
    """
    return max(16, budget_bytes // (4 * vocab_size))


class RowFile:
    """Rows of a 2-D C-order ``.npy`` file, read and written with pread/pwrite at header offsets.

    Nothing is memory-mapped: pages touched at random starts stay in the kernel's page cache
    (shared, reclaimable) instead of piling up in the process's resident set, as the pages of
    a long-lived ``np.memmap`` do (a 376 MB WikiText-2 file read at random grew RSS by 359 MB).
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, int], writable: bool = False):
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), shape
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                got_shape, fortran, got = read_header(f)
                self.offset = f.tell()
        except (OSError, ValueError) as e:
            raise SoftLabelError(f"cannot read {path}: {e}") from None
        if got_shape != shape or fortran or np.dtype(got) != self.dtype:
            raise SoftLabelError(f"{path} holds {np.dtype(got)} {got_shape}, expected {self.dtype} {shape}")
        self.row_bytes = shape[1] * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        if os.fstat(self.fd).st_size < self.offset + shape[0] * self.row_bytes:
            self.close()
            raise SoftLabelError(f"{path} is truncated; regenerate the soft labels")

    def read(self, start: int, length: int) -> np.ndarray:
        """Rows ``start .. start + length - 1`` as a (length, k) array."""
        raw = os.pread(self.fd, length * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape(length, self.shape[1])

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write (n, k) ``rows`` from row ``start`` on."""
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        try:
            n = os.pwrite(self.fd, data, self.offset + start * self.row_bytes)
        except OSError as e:
            raise self._failed(e) from e
        if n != len(data):
            raise self._failed(OSError(errno.ENOSPC, "short write"))

    def sync(self) -> None:
        """Make everything written so far durable."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise self._failed(e) from e

    def _failed(self, e: OSError) -> SoftLabelError:
        # The manifest vouches only for rows synced before it was written: those survive.
        return SoftLabelError(f"{write_error(self.path, e)}; the rows recorded in manifest.json are kept: "
                              "make room and run the same command again to resume")

    def close(self) -> None:
        """Release the file descriptor (idempotent)."""
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def _save_state(path: Path, rows_done: int, mem: Memory | None) -> None:
    buf = io.BytesIO()
    torch.save({"rows_done": rows_done, "kv": None if mem is None else [t.cpu() for t in mem.kv],
                "n_valid": 0 if mem is None else mem.n_valid}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_state(path: Path, device: torch.device) -> tuple[int, Memory | None]:
    state = torch.load(path, map_location=device, weights_only=True)
    mem = None if state["kv"] is None else Memory(list(state["kv"]), int(state["n_valid"]))
    return int(state["rows_done"]), mem


def _prepare_dir(out_dir: Path, tokens: np.ndarray, topk: int, chunk_len: int, meta: dict,
                 device: torch.device) -> tuple[dict, RowFile | None, RowFile | None, int, Memory | None]:
    """Open (resume) or create the arrays; returns manifest, ids, probs, rows_done, memory."""
    n = len(tokens)
    manifest = read_manifest(out_dir)
    ids_path, probs_path, state_path = out_dir / "ids.npy", out_dir / "probs.npy", out_dir / "state.pt"
    if manifest is not None:
        for key, want in (("topk", topk), ("tokens", n), ("chunk_len", chunk_len), ("teacher", meta["teacher"])):
            if manifest.get(key) != want:
                raise SoftLabelError(f"{out_dir} was started with {key}={manifest.get(key)!r}, not {want!r}; "
                                     f"use the same setting or delete that directory")
        if manifest.get("data") != meta["data"]:
            raise SoftLabelError(f"{out_dir} was made from other data ({manifest.get('data')}); "
                                 f"delete it to regenerate")
        if manifest.get("complete"):
            return manifest, None, None, n, None  # type: ignore[return-value]
        try:
            rows_done, mem = _load_state(state_path, device)
            ids = RowFile(ids_path, IDS_DTYPE, (n, topk), writable=True)
            probs = RowFile(probs_path, PROBS_DTYPE, (n, topk), writable=True)
            log.info("resuming %s at row %d of %d", out_dir, rows_done, n)
            return manifest, ids, probs, rows_done, mem
        except (OSError, ValueError, RuntimeError, KeyError, EOFError, SoftLabelError) as e:
            log.warning("cannot resume %s (%s); starting again from row 0", out_dir, e)
    out_dir.mkdir(parents=True, exist_ok=True)
    # open_memmap w+ makes a sparse, zero-filled .npy: row 0 (no context) is already ids 0 / probs 0.
    for path, dtype in ((ids_path, IDS_DTYPE), (probs_path, PROBS_DTYPE)):
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, topk))  # unmapped at once: see RowFile
    ids = RowFile(ids_path, IDS_DTYPE, (n, topk), writable=True)
    probs = RowFile(probs_path, PROBS_DTYPE, (n, topk), writable=True)
    manifest = {"format": FORMAT, **meta, "topk": topk, "tokens": n, "chunk_len": chunk_len,
                "rows": ROW_MEANING, "ids": {"file": ids_path.name, "dtype": IDS_DTYPE.name},
                "probs": {"file": probs_path.name, "dtype": PROBS_DTYPE.name},
                "bytes_per_entry": IDS_DTYPE.itemsize + PROBS_DTYPE.itemsize,
                "rows_done": 1, "complete": False, "code": code_version()}
    _save_state(state_path, 1, None)
    write_json(out_dir / "manifest.json", manifest)
    return manifest, ids, probs, 1, None


@torch.no_grad()
def generate_soft_labels(model: torch.nn.Module, tokens: np.ndarray, out_dir: Path, topk: int, meta: dict,
                         chunk_len: int = 4032, block_tokens: int = 65536, row_block: int = 0,
                         device: torch.device | str = "cpu", stop_after_blocks: int = 0,
                         on_block: Callable[[int], None] | None = None) -> dict:
    """Write (or resume) the top-``topk`` soft labels of ``model`` over ``tokens`` into ``out_dir``.

    ``model`` needs ``model(x (1, T), memory) -> (h (1, T, d), Memory)`` and ``model.log_probs(h)``.
    ``meta`` must hold ``teacher``, ``step`` and ``data`` (see :func:`data_fingerprint`); it is
    recorded in the manifest and checked on resume. Returns the manifest as written.
    """
    device = torch.device(device)
    model.eval()
    n = len(tokens)
    if n < 2:
        raise SoftLabelError(f"need at least 2 tokens to make soft labels, got {n}")
    vocab = int(getattr(getattr(model, "cfg", None), "vocab_size", 0) or meta["data"]["vocab_size"])
    if topk > vocab:
        raise ConfigError(f"topk={topk} is larger than the vocabulary ({vocab})")
    manifest, ids, probs, rows_done, mem = _prepare_dir(out_dir, tokens, topk, chunk_len, meta, device)
    if manifest.get("complete"):
        log.info("%s is already complete", out_dir)
        return manifest
    row_block = row_block or auto_row_block(vocab)
    chunks_per_block = max(1, -(-block_tokens // chunk_len))
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    n_pred = n - 1
    pos = rows_done - 1  # next input position; its prediction is row pos + 1 (always on the chunk grid)
    t0, pos0, blocks, chunks = time.perf_counter(), pos, 0, 0
    with StopSignals() as stop, bar(n_pred, f"soft labels {meta['teacher']}", "tok", count=pos) as pbar:
        while pos < n_pred:
            end = min(pos + chunk_len, n_pred)
            h, mem = model(data[pos:end].to(device)[None], mem)  # h: (1, T, d_model)
            mem = mem.detach()
            h = h[0]  # (T, d_model); row t predicts token pos + 1 + t
            for a in range(0, end - pos, row_block):
                b = min(a + row_block, end - pos)
                top = model.log_probs(h[a:b]).float().topk(topk, dim=-1)  # (rows, k) sorted, descending
                ids.write(pos + 1 + a, top.indices.to(torch.int32).cpu().numpy())
                probs.write(pos + 1 + a, top.values.exp().to(torch.float16).cpu().numpy())
            rate = (end - pos0) / max(1e-9, time.perf_counter() - t0)
            pbar.update(end - pos, status=f"{rate:,.0f} tok/s | ETA {_hms((n_pred - end) / max(rate, 1e-9))}")
            pos, chunks = end, chunks + 1
            if chunks % chunks_per_block == 0 or pos == n_pred or stop.signum:
                blocks += 1
                _checkpoint(out_dir, manifest, ids, probs, pos + 1, mem, pos == n_pred, rate)
                if on_block is not None:
                    on_block(pos + 1)
                if stop.signum or (stop_after_blocks and blocks >= stop_after_blocks and pos < n_pred):
                    log.info("stopped at row %d of %d; run the same command again to continue", pos + 1, n)
                    if stop.signum:
                        raise KeyboardInterrupt if stop.signum == signal.SIGINT else SystemExit(143)
                    break
    ids.close()
    probs.close()
    return manifest


def _checkpoint(out_dir: Path, manifest: dict, ids: RowFile, probs: RowFile, rows_done: int,
                mem: Memory | None, complete: bool, rate: float) -> None:
    """Arrays first, then the memory for resuming, then the manifest: each step vouches only for the previous."""
    ids.sync()
    probs.sync()
    if not complete:
        _save_state(out_dir / "state.pt", rows_done, mem)
    manifest.update(rows_done=rows_done, complete=complete, tokens_per_s=round(rate, 1))
    write_json(out_dir / "manifest.json", manifest)
    if complete:  # only now: a crash before the manifest says complete must still be resumable
        (out_dir / "state.pt").unlink(missing_ok=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
