"""Word-level corpora: raw text -> cached int32 token arrays.

Each line is split on whitespace and one ``<eos>`` appended (empty lines too). The vocabulary comes
from train only, by training frequency (ties: first occurrence in train); a valid/test word missing
from it is an error (WikiText/PTB have no OOV words). Caches, ``data_root()/cache/<name>/{train,valid,
test}.npy, vocab.txt, manifest.json``, are written via temp files + rename, manifest last: a crash
never leaves a cache that looks complete. Two corpora never share a cache: when ``cache/<name>/`` holds another
corpus (other source contents), this one goes to ``cache/<name>-<12 hex of its sha256s>/``.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import tarfile
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import enlighten
import numpy as np

from micronet.data.fetch import DataError, Progress, atomic_path, download, mib_bar, progress_manager, sha256_file
from micronet.runs.paths import PROJECT_ROOT, data_root

log = logging.getLogger(__name__)

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WIKITEXT103_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"
SHIPPED_WIKITEXT2 = PROJECT_ROOT / "data" / "wikitext-2-v1.tar.xz"

# From the SHA256SUMS files of the byte-exact shared copies (official WikiText v1).
_KNOWN_SHA256: dict[str, dict[str, str]] = {
    "wikitext-2": {
        "wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    },
    "wikitext-103": {
        "wiki.valid.tokens": "9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b",
        "wiki.test.tokens": "56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9",
    },
}
_DEFAULT_URLS = {"wikitext-103": WIKITEXT103_URL}
_CHUNK_TOKENS = 1 << 20  # ids buffered before being copied into the output array


@dataclass
class DataConfig:
    """Where a corpus comes from and which cache folder it goes to.

    Functions taking one also accept any object with these attributes (a Hydra DictConfig).
    """

    name: str = "wikitext-2"
    raw_dir: str | None = None
    train_file: str = "wiki.train.tokens"
    valid_file: str = "wiki.valid.tokens"
    test_file: str = "wiki.test.tokens"
    url: str | None = None
    verify_sha256: bool = True


def _files(cfg: DataConfig) -> dict[str, str]:
    # Attribute access only, so a Hydra DictConfig with these keys works as well.
    return {"train": cfg.train_file, "valid": cfg.valid_file, "test": cfg.test_file}


@dataclass
class Corpus:
    """A tokenized corpus: vocabulary plus one int32 id array per split."""

    vocab: list[str]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    manifest: dict

    def split(self, name: str) -> np.ndarray:
        """The id array of split ``name`` (train, valid or test)."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    @property
    def vocab_size(self) -> int:
        """Number of words in the vocabulary (including ``<eos>``)."""
        return len(self.vocab)

    def record(self) -> dict:
        """What a run records of the corpus it really used (``corpus:`` in config.yaml and checkpoints):
        :meth:`fingerprint` plus the source folder."""
        return {**self.fingerprint(), "raw_dir": self.manifest.get("source_dir")}

    def fingerprint(self) -> dict:
        """What a checkpoint records of its data: name, vocabulary size, tokens and sha256 per split."""
        files = self.manifest.get("files", {})
        return {"name": self.manifest.get("name"), "vocab_size": self.vocab_size,
                "tokens": self.manifest.get("tokens"), "sha256": {s: f.get("sha256") for s, f in files.items()}}


def _read_lines(path: Path, manager: enlighten.Manager | None) -> Iterator[list[str]]:
    """Yield the whitespace-split words of each line of ``path`` (strict UTF-8)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; put it there or point data.raw_dir at its folder")
    offset = lineno = 0
    bar = mib_bar(manager, path.stat().st_size, path.name)
    with open(path, "rb") as f:
        # Binary lines so the byte offset of a bad byte is known; lines end at b"\n"
        # only (a lone "\r" is whitespace here; WikiText has none).
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: not valid UTF-8 at byte offset {offset + e.start} (line {lineno}); "
                    "re-download the file or convert it to UTF-8"
                ) from None
            yield line.split()
            done = offset >> 20
            offset += len(raw)
            if bar is not None and offset >> 20 != done:
                bar.update((offset >> 20) - done)
    if bar is not None:
        bar.close()
    if lineno == 0:
        raise DataError(f"{path}: file is empty (0 lines); re-download it or fix data.raw_dir")


def count_words(path: str | os.PathLike, progress: Progress = False) -> tuple[Counter[str], int]:
    """Word frequencies of one file (``<eos>`` counted once per line) and its token total.

    The Counter's key order is first-occurrence order, which ``build_vocab`` uses for ties.
    """
    counts: Counter[str] = Counter()
    total = 0
    with progress_manager(progress) as manager:
        for words in _read_lines(Path(path), manager):
            counts.update(words)
            counts[EOS] += 1
            total += len(words) + 1
    return counts, total


def build_vocab(counts: Counter[str]) -> list[str]:
    """Words by descending frequency; ties keep the Counter's (first-occurrence) order."""
    # sorted() is stable, so equal counts stay in insertion order.
    return [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1])]


def tokenize_file(
    path: str | os.PathLike,
    word_to_id: Mapping[str, int] | None = None,
    out: np.ndarray | None = None,
    progress: Progress = False,
) -> np.ndarray:
    """Map a file to int32 ids, one ``<eos>`` per line.

    ``word_to_id`` None builds the vocabulary from this file itself (``build_vocab``
    order). ``out``, if given, must have exactly the file's token count and is filled
    in place (e.g. a memmap, so huge files never sit in RAM); else a new array is returned.
    A word missing from ``word_to_id`` raises ``DataError`` naming file, line and word.
    """
    path = Path(path)
    if word_to_id is None:
        word_to_id = {w: i for i, w in enumerate(build_vocab(count_words(path)[0]))}
    if EOS not in word_to_id:
        raise DataError(f"{path}: the vocabulary has no {EOS!r}; build it with count_words/build_vocab")
    eos, lookup = word_to_id[EOS], word_to_id.__getitem__
    buf, pos = array("i"), 0
    with progress_manager(progress) as manager:
        for lineno, words in enumerate(_read_lines(path, manager), 1):
            try:
                buf.extend(map(lookup, words))
            except KeyError as e:
                raise DataError(
                    f"{path} line {lineno}: word {e.args[0]!r} is not in the vocabulary built from the "
                    "training split; map unknown words to <unk> in the source files (WikiText-style "
                    "corpora have none) or check that the right files are configured"
                ) from None
            buf.append(eos)
            if out is not None and len(buf) >= _CHUNK_TOKENS:
                pos = _flush(out, pos, buf, path)
                buf = array("i")
    if out is None:
        return np.frombuffer(buf, dtype=np.intc).astype(np.int32, copy=False)
    if _flush(out, pos, buf, path) != len(out):
        raise DataError(f"{path}: has fewer tokens than `out` ({len(out)}); did it change while being read?")
    return out


def _flush(out: np.ndarray, pos: int, buf: array, path: Path) -> int:
    end = pos + len(buf)
    if end > len(out):
        raise DataError(f"{path}: has more tokens than `out` ({len(out)}); did it change while being read?")
    out[pos:end] = np.frombuffer(buf, dtype=np.intc)
    return end


def _extract_shipped(raw_dir: Path) -> None:
    if not SHIPPED_WIKITEXT2.is_file():
        raise DataError(f"{SHIPPED_WIKITEXT2}: shipped WikiText-2 archive missing; restore it from git")
    raw_dir.mkdir(parents=True, exist_ok=True)
    log.info("extracting %s into %s", SHIPPED_WIKITEXT2, raw_dir)
    # Stream mode decompresses once; files are written ourselves (flat, writable),
    # not with extractall, which would copy the archive's read-only modes.
    with tarfile.open(SHIPPED_WIKITEXT2, "r|xz") as tf:
        for member in tf:
            if member.isfile():
                final = raw_dir / PurePosixPath(member.name).name
                with atomic_path(final) as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(tf.extractfile(member), dst, 1 << 20)


def _raw_dir(cfg: DataConfig) -> Path:
    if cfg.raw_dir is not None:
        return Path(cfg.raw_dir).expanduser().resolve()
    if cfg.name == "wikitext-2" or cfg.url or cfg.name in _DEFAULT_URLS:
        return data_root() / "raw" / cfg.name
    raise DataError(
        f"no built-in source for data set {cfg.name!r} (built-in: wikitext-2, wikitext-103); "
        f"set data.raw_dir to the folder holding {cfg.train_file}, {cfg.valid_file}, {cfg.test_file}"
    )


def _source_url(cfg: DataConfig) -> str | None:
    # Built-in sources only fill the built-in folder; a user's raw_dir gets only an explicit url.
    return cfg.url or (_DEFAULT_URLS.get(cfg.name) if cfg.raw_dir is None else None)


def _ships(cfg: DataConfig) -> bool:
    return cfg.raw_dir is None and cfg.name == "wikitext-2" and cfg.url is None


def _fetch_sources(cfg: DataConfig, raw_dir: Path, progress: Progress) -> None:
    """Extract or download the raw files if some are missing and a source is known."""
    if all((raw_dir / f).is_file() for f in _files(cfg).values()):
        return
    if _ships(cfg):
        _extract_shipped(raw_dir)
    elif url := _source_url(cfg):
        log.info("downloading %s into %s", url, raw_dir)
        download(url, raw_dir, progress)


def _require(sources: dict[str, Path]) -> None:
    for path in sources.values():
        if not path.is_file():
            raise DataError(f"{path}: split file not found; put it there or point data.raw_dir at its folder")


def _read_manifest(cache_dir: Path) -> dict | None:
    try:
        return json.loads((cache_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _source_hashes(sources: dict[str, Path]) -> dict[str, str] | None:
    """sha256 per split; None unless every source file is there."""
    return {s: sha256_file(p) for s, p in sources.items()} if all(p.is_file() for p in sources.values()) else None


def _cache_dir(cfg: DataConfig, raw_dir: Path, sources: dict[str, Path], hashes: dict[str, str] | None) -> Path:
    """``cache/<name>/``, unless it holds another corpus (other sha256s): then ``cache/<name>-<digest>/``.

    Without the sources (deleted after caching, ``hashes`` None): the newest cache built from this folder
    and these file names, else ``cache/<name>/``.
    """
    plain = data_root() / "cache" / cfg.name
    if hashes is None:
        built = [d for d in (plain, *plain.parent.glob(glob.escape(cfg.name) + "-*"))
                 if _same_files(_read_manifest(d), raw_dir, sources)]
        return max(built, key=lambda d: (d / MANIFEST).stat().st_mtime_ns) if built else plain
    files = (_read_manifest(plain) or {}).get("files")
    if not files or all(files.get(s, {}).get("sha256") == h for s, h in hashes.items()):
        return plain
    digest = hashlib.sha256(" ".join(hashes[s] for s in SPLITS).encode()).hexdigest()[:12]
    return plain.with_name(f"{cfg.name}-{digest}")


def _same_files(m: dict | None, raw_dir: Path, sources: dict[str, Path]) -> bool:
    files = (m or {}).get("files", {})
    return bool(m) and (m.get("format_version"), m.get("source_dir")) == (FORMAT_VERSION, str(raw_dir)) and all(
        files.get(s, {}).get("file") == p.name for s, p in sources.items())


def _cache_is_current(cache_dir: Path, raw_dir: Path, sources: dict[str, Path], hashes: dict[str, str] | None) -> bool:
    m = _read_manifest(cache_dir)
    if not _same_files(m, raw_dir, sources) or not all(
            (cache_dir / f).is_file() for f in ("vocab.txt", *(f"{s}.npy" for s in SPLITS))):
        return False
    if hashes is None:  # raw files deleted after caching (e.g. to save disk): the cache stands alone
        return not any(p.is_file() for p in sources.values())
    return all(m["files"][s]["sha256"] == h for s, h in hashes.items())


def prepare(cfg: DataConfig, progress: Progress = True) -> Path:
    """Build the token cache of ``cfg`` unless it is current; return the cache folder.

    ``progress``: show enlighten bars (True), none (False), or use this enlighten manager.
    Idempotent and safe to call from concurrent processes. A corpus whose source sha256s, file
    names or source folder no longer match its cache is rebuilt; one whose contents differ from
    what ``cache/<name>/`` holds gets its own folder (:func:`_cache_dir`). Raises ``DataError``
    for missing, empty, non-UTF-8, wrongly checksummed or OOV split files (a missing one that
    cannot be extracted or downloaded before any folder is made).
    """
    raw_dir = _raw_dir(cfg)
    sources = {s: raw_dir / f for s, f in _files(cfg).items()}
    hashes = _source_hashes(sources)
    cache_dir = _cache_dir(cfg, raw_dir, sources, hashes)
    if _cache_is_current(cache_dir, raw_dir, sources, hashes):
        return cache_dir
    if not (_ships(cfg) or _source_url(cfg)):
        _require(sources)
    lock_dir = data_root() / "cache" / cfg.name  # one lock per data set name: its caches are chosen under it
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".lock", "a") as lock, progress_manager(progress) as manager:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder (and downloader) at a time
        _fetch_sources(cfg, raw_dir, manager)
        _require(sources)
        if hashes is None:
            hashes = _source_hashes(sources)
        cache_dir = _cache_dir(cfg, raw_dir, sources, hashes)  # another process may have built it meanwhile
        if not _cache_is_current(cache_dir, raw_dir, sources, hashes):
            cache_dir.mkdir(parents=True, exist_ok=True)
            _build(cfg, raw_dir, cache_dir, sources, hashes, manager)
    return cache_dir


def _build(cfg: DataConfig, raw_dir: Path, cache_dir: Path, sources: dict[str, Path], hashes: dict[str, str],
           manager) -> None:
    known = _KNOWN_SHA256.get(cfg.name, {}) if cfg.verify_sha256 else {}
    for s, p in sources.items():
        if p.name in known and hashes[s] != known[p.name]:
            raise DataError(
                f"{p}: sha256 {hashes[s]} does not match the official {cfg.name} file "
                f"({known[p.name]}); the file is corrupt or a different version: delete it and "
                "run again to re-extract/re-download, or set data.verify_sha256=false"
            )

    log.info("building token cache %s from %s", cache_dir, raw_dir)
    counts, n_train = count_words(sources["train"], manager)
    vocab = build_vocab(counts)
    del counts
    word_to_id = {w: i for i, w in enumerate(vocab)}
    # valid/test (small) first: an OOV or empty file fails before anything is written
    # and before the long second pass over train.
    held_out = {s: tokenize_file(sources[s], word_to_id, progress=manager) for s in ("valid", "test")}
    tokens = {"train": n_train, **{s: len(ids) for s, ids in held_out.items()}}
    # An old manifest must never vouch for half-rewritten arrays.
    (cache_dir / MANIFEST).unlink(missing_ok=True)
    with atomic_path(cache_dir / "train.npy") as tmp:
        # Second pass straight into a memmapped .npy: WikiText-103 never sits in RAM as a list.
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n_train,))
        tokenize_file(sources["train"], word_to_id, out=mm, progress=manager)
        mm.flush()
        del mm
    for s, ids in held_out.items():
        with atomic_path(cache_dir / f"{s}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, ids)
    with atomic_path(cache_dir / "vocab.txt") as tmp:
        tmp.write_text("".join(w + "\n" for w in vocab), encoding="utf-8")

    manifest = {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "source_dir": str(raw_dir),
        "files": {s: {"file": p.name, "sha256": hashes[s], "bytes": p.stat().st_size} for s, p in sources.items()},
        "tokens": tokens,
        "vocab_size": len(vocab),
        "eos": EOS,
        "vocab_order": "training frequency, descending; ties keep first-occurrence order in train",
    }
    with atomic_path(cache_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def load_corpus(cfg: DataConfig, progress: Progress = True) -> Corpus:
    """Prepare the cache if needed, then load it (arrays memory-mapped read-only)."""
    cache_dir = prepare(cfg, progress)
    manifest = _read_manifest(cache_dir) or {}
    vocab = (cache_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    arrays = {s: np.load(cache_dir / f"{s}.npy", mmap_mode="r") for s in SPLITS}
    bad = len(vocab) != manifest.get("vocab_size") or any(
        a.dtype != np.int32 or a.ndim != 1 or len(a) != manifest.get("tokens", {}).get(s) for s, a in arrays.items()
    )
    if bad:
        raise DataError(f"{cache_dir}: cache files disagree with {MANIFEST}; delete the folder and run again")
    return Corpus(vocab=vocab, manifest=manifest, **arrays)
