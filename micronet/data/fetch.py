"""Fetching corpora: download with progress and atomic rename, safe zip extraction, sha256.

Used by :mod:`micronet.data.corpus` (sources) and :mod:`micronet.report.data_setup` (verification).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Union

import enlighten

from micronet.runs.config import MicronetError
from micronet.runs.progress import manager as shared_manager

Progress = Union[bool, None, enlighten.Manager]  # bars on/off, or a caller's enlighten manager


class DataError(MicronetError, ValueError):
    """A corpus file is missing, empty, corrupt or inconsistent (message says which and what to do)."""


@contextlib.contextmanager
def progress_manager(progress: Progress) -> Iterator[enlighten.Manager | None]:
    """The enlighten manager to draw bars with: None (bars off), the caller's, or the process-wide one."""
    if progress is not True:
        yield None if progress is False else progress
        return
    yield shared_manager()  # the process-wide manager: one per process owns the terminal


def mib_bar(manager: enlighten.Manager | None, total_bytes: int, desc: str) -> enlighten.Counter | None:
    """A transient MiB progress bar, or None without a manager."""
    if manager is None:
        return None
    return manager.counter(total=max(1, total_bytes >> 20), desc=desc, unit="MiB", leave=False)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; rename it onto ``final`` only on success."""
    # Not mkstemp: its 0600 mode would make shared caches unreadable; open("x") honours umask.
    tmp = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    open(tmp, "xb").close()
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def download(url: str, dest_dir: Path, progress: Progress = True) -> Path:
    """Download a zip into ``dest_dir``, extract it there and return the folder with its files.

    A single top-level folder in the zip (``wikitext-103/...``) is stripped, so the split
    files land directly in ``dest_dir``. The zip is fetched to a temp file and renamed when
    complete; it is deleted after a successful extraction, or when it proves corrupt.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    zip_path = dest_dir / (PurePosixPath(urllib.parse.urlparse(url).path).name or "download.zip")
    if not zip_path.is_file():  # a complete zip from an interrupted earlier run is reused
        _fetch(url, zip_path, progress)
    try:
        _extract_zip(zip_path, dest_dir)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        zip_path.unlink(missing_ok=True)
        raise DataError(
            f"{zip_path} (from {url}) is not a valid zip ({e}); it was deleted, run again to "
            f"re-download, or unpack the split files into {dest_dir} by hand"
        ) from None
    zip_path.unlink()
    return dest_dir


def _fetch(url: str, final: Path, progress: Progress) -> None:
    hint = f"check data.url, or download the zip by hand and unpack its split files into {final.parent}"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, atomic_path(final) as tmp:
            expected = int(resp.headers.get("Content-Length") or 0)
            got = 0
            with open(tmp, "wb") as f, progress_manager(progress) as manager:
                bar = mib_bar(manager, expected, f"download {final.name}")
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    got += len(chunk)
                    if bar is not None:
                        bar.update()
                if bar is not None:
                    bar.close()
            # http.client does not complain when a known-length body ends early.
            if expected and got != expected:
                raise DataError(f"download of {url} stopped after {got} of {expected} bytes; {hint}")
    except urllib.error.HTTPError as e:
        raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}; {hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"download of {url} failed: {e}; {hint}") from None


def _extract_zip(zip_path: Path, dest_dir: Path) -> None:
    with zipfile.ZipFile(zip_path) as zf:
        members = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
        parts = [PurePosixPath(i.filename).parts for i in members]
        if not members or any(p[0] == "/" or ".." in p for p in parts):
            raise zipfile.BadZipFile("no files, or unsafe member paths")
        strip = 1 if len({p[0] for p in parts}) == 1 and all(len(p) > 1 for p in parts) else 0
        # Extract everything to a temp folder first, so a bad member leaves no split files.
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".extract-") as tmp:
            rels = [Path(*p[strip:]) for p in parts]
            for info, rel in zip(members, rels):
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(Path(tmp) / rel, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            for rel in rels:
                (dest_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / rel, dest_dir / rel)
