"""Data set-up and split statistics for the notebooks, and the table formatter they share.

``setup_data.ipynb`` calls these through :mod:`micronet.report`, which re-exports them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from micronet.data import corpus as data
from micronet.runs.config import typed
from micronet.data.corpus import SPLITS, Corpus, DataConfig, DataError, load_corpus
from micronet.runs.paths import CONF_DIR, data_root

DEFAULT_CUTOFFS = (3500, 25000)  # the original 8.3M model's adaptive-softmax bins (WikiText-103)
DATASET_MODELS = {"wikitext-2": "wt2_8.3M", "wikitext-103": "8.3M"}
"""The model whose adaptive-softmax bins a data set's statistics use by default (``conf/model/<name>.yaml``)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=,-]*$")
_NUMERIC = re.compile(r"^(-|[-+]?[0-9][0-9,]*(\.[0-9]+)?(e[-+]?[0-9]+)?[*%]?)$")

# ----------------------------------------------------------------------------- data set-up


def data_config(name: str = "wikitext-2", url: str | None = None, verify: bool = True) -> DataConfig:
    """The :class:`DataConfig` that training uses for ``name`` (``conf/data/<name>.yaml`` when it
    exists, else defaults), with ``url`` and ``verify_sha256`` overridden when given."""
    if not _NAME.match(name):
        raise DataError(f"invalid data set name {name!r}")
    path = CONF_DIR / "data" / f"{name}.yaml"
    node = yaml.safe_load(path.read_text()) if path.is_file() else {"name": name}
    cfg = typed(DataConfig, node, "data")
    cfg.url = url or cfg.url
    cfg.verify_sha256 = verify
    return cfg


def _split_files(cfg: DataConfig) -> dict[str, str]:
    return {"train": cfg.train_file, "valid": cfg.valid_file, "test": cfg.test_file}


def read_sha256sums(folder: str | os.PathLike) -> dict[str, str]:
    """File name -> sha256 from ``folder/SHA256SUMS`` (``sha256sum`` format); {} when absent."""
    path = Path(folder) / "SHA256SUMS"
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def setup_data(name: str = "wikitext-2", local_dir: str | os.PathLike | None = None, url: str | None = None,
               *, download: bool = True, verify: bool = True, progress: bool = False) -> Corpus:
    """Locate or download a corpus, verify checksums and build its token cache; return the corpus.

    ``local_dir`` None: the built-in source (WikiText-2: the shipped archive, offline; WikiText-103:
    the configured zip, or ``url``). Otherwise the split files in ``local_dir`` (e.g. the shared copy
    ``../shared/data/wikitext-103``) are checked against its ``SHA256SUMS`` and copied into the
    folder training reads (``data_root()/raw/<name>``), so ``python -m micronet.train data=<name>``
    finds the cache current. A folder without the train split gets it from the configured zip
    (or ``url``) when ``download`` is true, else :class:`DataError` says it must be downloaded.
    ``verify``: also check the official sha256 of WikiText files (``micronet.data``). A data set
    without ``conf/data/<name>.yaml`` is read from ``local_dir`` in place.
    """
    corpus = _setup(data_config(name, url, verify), local_dir, download, progress)
    if verify:  # also when an earlier unverified call built the cache, which micronet.data then trusts
        for row in checksum_rows(corpus):
            if row["status"] == "DIFFERENT":
                raise DataError(f"{row['file']}: sha256 {row['sha256']} does not match the official {name} file "
                                f"({row['official']}); use the official files, or verify=False")
    return corpus


def _setup(cfg: DataConfig, local_dir: str | os.PathLike | None, download: bool, progress: bool) -> Corpus:
    name = cfg.name
    if local_dir is None:
        print(f"{name}: built-in source ({cfg.url or 'shipped archive'}) -> {data_root()}")
        return load_corpus(cfg, progress=progress)
    src = Path(local_dir).expanduser().resolve()
    if not src.is_dir():
        raise DataError(f"{src}: no such folder; set local_dir to the folder holding the split files")
    files = _split_files(cfg)
    _check_local_sums(src, [f for f in files.values() if (src / f).is_file()])
    if not (CONF_DIR / "data" / f"{name}.yaml").is_file():
        cfg.raw_dir = str(src)
        return load_corpus(cfg, progress=progress)
    missing = [s for s, f in files.items() if not (src / f).is_file()]
    if set(missing) - {"train"}:
        raise DataError(f"{src}: missing {', '.join(files[s] for s in missing)}; a local copy needs at least "
                        "the valid and test splits")
    dest = data_root() / "raw" / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in files.values():
        if (src / f).is_file():
            _stage(src / f, dest / f)
    train = dest / files["train"]
    if "train" in missing and not train.is_file():
        if not cfg.url:
            raise DataError(f"{src} has no {files['train']} and {name} has no download URL: pass url=... "
                            f"or put the train split into {src}")
        if not download:
            raise DataError(f"{src} has no {files['train']}: the {name} train split must be downloaded from "
                            f"{cfg.url} (setup_data(..., download=True); notebook: DOWNLOAD = True), "
                            f"or put the file into {dest}")
        print(f"{src} has no {files['train']}: downloading {cfg.url} for it")
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
            got = data.download(cfg.url, Path(tmp), progress) / files["train"]
            if not got.is_file():
                raise DataError(f"{cfg.url} has no {files['train']}; check url")
            os.replace(got, train)
    print(f"{name}: split files from {src} -> {dest}")
    return load_corpus(cfg, progress=progress)


def _check_local_sums(folder: Path, names: Sequence[str]) -> None:
    sums = read_sha256sums(folder)
    for f in names:
        if f in sums and data.sha256_file(folder / f) != sums[f]:
            raise DataError(f"{folder / f}: sha256 does not match {folder / 'SHA256SUMS'}; the copy is corrupt")


def _stage(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` atomically unless ``dest`` already holds the same bytes."""
    if dest.exists() and dest.resolve() == src.resolve():
        return
    if dest.is_file() and dest.stat().st_size == src.stat().st_size and data.sha256_file(dest) == data.sha256_file(src):
        return
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def checksum_rows(corpus: Corpus) -> list[dict]:
    """One row per split: file, sha256 (from the cache manifest) and whether it is the official one."""
    known = getattr(data, "_KNOWN_SHA256", {}).get(corpus.manifest.get("name"), {})
    rows = []
    for split, info in corpus.manifest.get("files", {}).items():
        official = known.get(info["file"])
        status = "not listed" if official is None else ("official" if official == info["sha256"] else "DIFFERENT")
        rows.append({"split": split, "file": info["file"], "bytes": info.get("bytes"), "sha256": info["sha256"],
                     "official": official, "status": status})
    return rows


def print_checksums(rows: Sequence[Mapping]) -> None:
    """Print :func:`checksum_rows`."""
    cols = [("split", "split", str), ("file", "file", str), ("bytes", "bytes", _int), ("sha256", "sha256", str),
            ("status", "official sha256", str)]
    print(format_table(rows, cols, fmt="text"))


def model_cutoffs(model: str) -> tuple[int, ...]:
    """The adaptive-softmax cutoffs of ``conf/model/<model>.yaml``."""
    path = CONF_DIR / "model" / f"{model}.yaml"
    if not _NAME.match(model) or not path.is_file():
        raise DataError(f"no model config {path}")
    return tuple(int(c) for c in (yaml.safe_load(path.read_text()) or {}).get("cutoffs", ()))


def split_statistics(corpus: Corpus, cutoffs: Sequence[int] | None = None) -> list[dict]:
    """Per split: tokens, lines (``<eos>``), distinct words, vocabulary size, ``<unk>`` count and
    share, and the fraction of tokens in each adaptive-softmax bin ``[0, c1), [c1, c2), ...``.

    ``cutoffs`` None: those of the corpus' own model (:data:`DATASET_MODELS`: wt2_8.3M for WikiText-2,
    8.3M for WikiText-103), else :data:`DEFAULT_CUTOFFS`. Each row names its ``cutoffs`` and ``model``.

    Words outside the training vocabulary cannot occur (``micronet.data`` refuses them), so the
    ``<unk>`` share is the corpus' own out-of-vocabulary rate. Cutoffs >= the vocab size are dropped.
    """
    model = DATASET_MODELS.get(corpus.manifest.get("name")) if cutoffs is None else None
    if cutoffs is None:
        cutoffs = model_cutoffs(model) if model else DEFAULT_CUTOFFS
    v = corpus.vocab_size
    cuts = [int(c) for c in cutoffs if 0 < int(c) < v]
    if cuts != sorted(set(cuts)):
        raise ValueError(f"cutoffs must be strictly increasing, got {list(cutoffs)}")
    ids = {w: i for i, w in enumerate(corpus.vocab) if w in (data.EOS, "<unk>")}
    rows = []
    for split in SPLITS:
        arr = corpus.split(split)
        counts = np.zeros(v, dtype=np.int64)
        for start in range(0, len(arr), 1 << 24):  # chunks: bincount would copy all of train to int64
            counts += np.bincount(arr[start:start + (1 << 24)], minlength=v)
        n = max(len(arr), 1)
        cum = np.concatenate([[0], np.cumsum(counts)])
        edges = [0, *cuts, v]
        unk = int(counts[ids["<unk>"]]) if "<unk>" in ids else 0
        rows.append({
            "split": split, "tokens": len(arr), "lines": int(counts[ids[data.EOS]]) if data.EOS in ids else None,
            "types": int(np.count_nonzero(counts)), "vocab": v, "unk": unk, "unk_share": unk / n,
            "cutoffs": tuple(cuts), "model": model,
            "bin_fractions": tuple(float(cum[b] - cum[a]) / n for a, b in zip(edges, edges[1:])),
        })
    return rows


def format_split_statistics(rows: Sequence[Mapping]) -> str:
    """:func:`split_statistics` as a text table."""
    cols: list = [("split", "split", str), ("tokens", "tokens", _int), ("lines", "lines", _int),
                  ("types", "distinct words", _int), ("vocab", "vocab", _int), ("unk", "<unk>", _int),
                  ("unk_share", "<unk> %", lambda x: f"{100 * x:.2f}")]
    cuts = rows[0]["cutoffs"] if rows else ()
    edges = ["0", *map(str, cuts), "V"]
    for i in range(len(cuts) + 1):
        cols.append((lambda r, i=i: r["bin_fractions"][i], f"bin [{edges[i]},{edges[i + 1]}) %",
                     lambda x: f"{100 * x:.2f}"))
    model = rows[0].get("model") if rows else None
    head = f"bins at cutoffs {list(cuts)}"
    if model:
        head = f"adaptive-softmax bins of model {model} (cutoffs {list(cuts)})"
    return head + "\n" + format_table(rows, cols, fmt="text")


def print_split_statistics(rows: Sequence[Mapping]) -> None:
    """Print :func:`split_statistics`."""
    print(format_split_statistics(rows))


# ----------------------------------------------------------------------------- tables


def _int(x: Any) -> str:
    return f"{x:,.0f}"


def _get(row: Mapping, key: str | Callable) -> Any:
    return key(row) if callable(key) else row.get(key)


def format_table(rows: Sequence[Mapping], columns: Sequence[tuple], fmt: str = "markdown") -> str:
    """Rows as a ``markdown`` or fixed-width ``text`` table; ``columns`` are (key or function of the
    row, header, formatter); None values print as ``-``."""
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be 'markdown' or 'text', got {fmt!r}")
    heads = [h for _, h, _ in columns]
    body = [[("-" if (v := _get(r, k)) is None else f(v)) for k, _, f in columns] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    width = [max([len(h), *(len(c[i]) for c in body)]) for i, h in enumerate(heads)]
    numeric = [bool(body) and all(_NUMERIC.match(c[i]) for c in body) for i in range(len(heads))]

    def line(cells: Sequence[str]) -> str:  # numbers right-aligned, text left-aligned
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, width, numeric)).rstrip()

    return "\n".join([line(heads), "  ".join("-" * w for w in width), *map(line, body)])
