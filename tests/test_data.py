"""Tests of micronet.data: exact WikiText counts, vocab order, download, errors, caching."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from micronet.data import corpus as D
from micronet.data.corpus import DataConfig, load_corpus, prepare
from micronet.data.fetch import DataError
from micronet.runs.paths import shared_data_dir

WT2_COUNTS = {"train": 2_088_628, "valid": 217_646, "test": 245_569}
WT2_VOCAB = 33_278


@pytest.fixture(autouse=True)
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes raw files and caches under its own tmp folder, never the repo."""
    root = tmp_path / "data_root"
    monkeypatch.setenv("MICRONET_DATA", str(root))
    return root


@pytest.fixture(scope="module")
def wt2_shipped(tmp_path_factory: pytest.TempPathFactory):
    """WikiText-2 built once from the shipped archive (shared by several tests)."""
    root = tmp_path_factory.mktemp("wt2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MICRONET_DATA", str(root))
        return load_corpus(DataConfig(), progress=False), root


def write_corpus(folder: Path, train: str, valid: str = "a b\n", test: str = "b a\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"wiki.{name}.tokens").write_text(text, encoding="utf-8")
    return folder


def tiny_cfg(folder: Path, **kw) -> DataConfig:
    return DataConfig(name="tiny", raw_dir=str(folder), **kw)


def no_temp_files(folder: Path) -> bool:
    """No temp files / extraction folders left (the build lock file is expected)."""
    return not [p for p in folder.rglob(".*") if p.name != ".lock"] if folder.exists() else True


def no_cache(root: Path, name: str) -> bool:
    """Nothing that could pass for a cache: no manifest, no arrays, no vocab."""
    folder = root / "cache" / name
    return not folder.exists() or not [p for p in folder.iterdir() if p.name != ".lock"]


# ------------------------------------------------------------- real corpora


def test_wikitext2_from_shipped_archive(wt2_shipped):
    corpus, root = wt2_shipped
    assert corpus.vocab_size == WT2_VOCAB == corpus.manifest["vocab_size"]
    for split, n in WT2_COUNTS.items():
        arr = corpus.split(split)
        assert arr.dtype == np.int32 and arr.ndim == 1 and len(arr) == n
        assert corpus.manifest["tokens"][split] == n
        assert 0 <= arr.min() and arr.max() < WT2_VOCAB
    assert corpus.vocab[:4] == ["the", ",", ".", "of"]
    assert corpus.vocab[corpus.train[0]] == "<eos>"  # first line of train is empty
    assert corpus.manifest["files"]["train"]["sha256"] == D._KNOWN_SHA256["wikitext-2"]["wiki.train.tokens"]
    assert (root / "raw" / "wikitext-2" / "wiki.train.tokens").is_file()
    assert no_temp_files(root)


def test_wikitext2_shared_copy_agrees(wt2_shipped):
    folder = shared_data_dir() / "wikitext-2"
    if not (folder / "wiki.train.tokens").is_file():
        pytest.skip(f"no shared WikiText-2 copy at {folder}")
    shipped, _ = wt2_shipped
    shared = load_corpus(DataConfig(name="wikitext-2", raw_dir=str(folder)), progress=False)
    assert shared.vocab == shipped.vocab
    for split in D.SPLITS:
        assert np.array_equal(shared.split(split), shipped.split(split))


def test_wikitext103_valid_test_counts():
    folder = shared_data_dir() / "wikitext-103"
    if not (folder / "wiki.valid.tokens").is_file():
        pytest.skip(f"no shared WikiText-103 copy at {folder}")
    assert D.count_words(folder / "wiki.valid.tokens")[1] == 217_646
    assert D.count_words(folder / "wiki.test.tokens")[1] == 245_569
    # The full pipeline (with checksums) on each file standing in for all three splits.
    for file, n in (("wiki.valid.tokens", 217_646), ("wiki.test.tokens", 245_569)):
        cfg = DataConfig(name="wikitext-103", raw_dir=str(folder), train_file=file, valid_file=file, test_file=file)
        corpus = load_corpus(cfg, progress=False)
        assert corpus.manifest["tokens"] == {"train": n, "valid": n, "test": n}
    with pytest.raises(DataError, match="wiki.test.tokens line"):  # test has words valid lacks
        load_corpus(DataConfig(name="wt103-oov", raw_dir=str(folder), train_file="wiki.valid.tokens"), progress=False)


# ---------------------------------------------------------- vocab and ids


def test_vocab_order_ties_keep_first_occurrence(tmp_path):
    folder = write_corpus(tmp_path / "raw", train="c b a\nb d\n\nb c a\n", valid="d d\n", test="\n")
    corpus = load_corpus(tiny_cfg(folder), progress=False)
    # lines: 4 -> <eos> 4; b 3; c 2, a 2; d 1. First occurrences: c, b, a, <eos>, d.
    assert corpus.vocab == ["<eos>", "b", "c", "a", "d"]
    words = [corpus.vocab[i] for i in corpus.train]
    assert words == "c b a <eos> b d <eos> <eos> b c a <eos>".split()
    assert [corpus.vocab[i] for i in corpus.valid] == ["d", "d", "<eos>"]
    assert [corpus.vocab[i] for i in corpus.test] == ["<eos>"]
    assert (D.data_root() / "cache" / "tiny" / "vocab.txt").read_text().split("\n")[:-1] == corpus.vocab


def test_vocab_ties_keep_first_occurrence_including_eos(tmp_path):
    # x 2, <eos> 2, y 1: <eos> first occurs after the first line's words, so after x.
    folder = write_corpus(tmp_path / "raw", train="x\ny x\n", valid="y\n", test="x\n")
    assert load_corpus(tiny_cfg(folder), progress=False).vocab == ["x", "<eos>", "y"]


def test_tokenize_file_own_vocab(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("a b a\n  \n", encoding="utf-8")
    assert D.tokenize_file(path).tolist() == [0, 2, 0, 1, 1]  # a 2, <eos> 2 (a first), b 1
    out = np.zeros(5, dtype=np.int32)
    assert D.tokenize_file(path, {"a": 0, "<eos>": 1, "b": 2}, out=out) is out
    with pytest.raises(DataError, match="fewer tokens"):
        D.tokenize_file(path, {"a": 0, "<eos>": 1, "b": 2}, out=np.zeros(6, dtype=np.int32))


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda d: (d / "wiki.test.tokens").unlink(), r"wiki\.test\.tokens: split file not found"),
        (lambda d: (d / "wiki.valid.tokens").write_bytes(b""), r"wiki\.valid\.tokens: file is empty"),
        (lambda d: (d / "wiki.train.tokens").write_bytes(b"ok\nab\xffc\n"), r"train\.tokens: not valid UTF-8 at byte offset 5 \(line 2\)"),
        (lambda d: (d / "wiki.valid.tokens").write_text("a zebra\n"), r"wiki\.valid\.tokens line 1: word 'zebra' is not in the vocabulary"),
    ],
    ids=["missing", "empty", "non-utf8", "oov"],
)
def test_bad_split_files(tmp_path, data_root, mutate, pattern):
    folder = write_corpus(tmp_path / "raw", train="a b\n")
    mutate(folder)
    with pytest.raises(DataError, match=pattern):
        load_corpus(tiny_cfg(folder), progress=False)
    assert no_cache(data_root, "tiny")
    assert no_temp_files(data_root)


def test_wrong_checksum(tmp_path, data_root):
    folder = write_corpus(tmp_path / "raw", train="a b\n")
    cfg = DataConfig(name="wikitext-2", raw_dir=str(folder))  # known sums apply to this name
    with pytest.raises(DataError, match=r"wiki\.train\.tokens: sha256 .*delete it.*verify_sha256"):
        prepare(cfg, progress=False)
    assert no_cache(data_root, "wikitext-2")
    cfg.verify_sha256 = False
    assert load_corpus(cfg, progress=False).vocab == ["a", "b", "<eos>"]


def test_unknown_name_without_raw_dir():
    with pytest.raises(DataError, match="no built-in source for data set 'ptb'.*raw_dir"):
        prepare(DataConfig(name="ptb"), progress=False)


# ------------------------------------------------------------------ caching


def test_cache_reused_and_rebuilt_on_change(tmp_path, data_root, monkeypatch):
    folder = write_corpus(tmp_path / "raw", train="a b\n")
    cfg = tiny_cfg(folder)
    first = load_corpus(cfg, progress=False)
    manifest = data_root / "cache" / "tiny" / "manifest.json"
    mtime = manifest.stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("re-tokenized although the cache is current")

    with monkeypatch.context() as m:
        m.setattr(D, "count_words", fail)
        m.setattr(D, "tokenize_file", fail)
        again = load_corpus(cfg, progress=False)
    assert manifest.stat().st_mtime_ns == mtime
    assert again.vocab == first.vocab and np.array_equal(again.train, first.train)

    (folder / "wiki.train.tokens").write_text("a b b\n", encoding="utf-8")  # b now most frequent
    rebuilt = load_corpus(cfg, progress=False)
    assert rebuilt.vocab == ["b", "a", "<eos>"] and len(rebuilt.train) == 4
    assert rebuilt.manifest["files"]["train"]["sha256"] != first.manifest["files"]["train"]["sha256"]

    # Raw files gone (deleted to save disk): the cache still serves.
    for p in folder.iterdir():
        p.unlink()
    assert load_corpus(cfg, progress=False).vocab == rebuilt.vocab


# ----------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        if self.path.endswith("/short.zip"):  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"PK\x03\x04" + b"\0" * 6)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_dir(tmp_path):
    """(folder served, base URL) of a real HTTP server on loopback."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def make_wt103_zip(path: Path) -> None:
    texts = {"train": " = T = \n\n the cat sat \n", "valid": " the cat \n", "test": " sat \n"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("wikitext-103/", "")
        for split, text in texts.items():
            zf.writestr(f"wikitext-103/wiki.{split}.tokens", text)


def test_download_builds_corpus(http_dir, data_root):
    folder, base = http_dir
    make_wt103_zip(folder / "wikitext-103-v1.zip")
    cfg = DataConfig(name="wikitext-103", url=f"{base}/wikitext-103-v1.zip", verify_sha256=False)
    corpus = load_corpus(cfg, progress=False)
    assert corpus.manifest["tokens"] == {"train": 9, "valid": 3, "test": 2}
    raw = data_root / "raw" / "wikitext-103"
    assert sorted(p.name for p in raw.iterdir()) == ["wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]
    assert corpus.manifest["source_dir"] == str(raw)


def test_download_checksum_checked(http_dir):
    folder, base = http_dir
    make_wt103_zip(folder / "wt.zip")
    with pytest.raises(DataError, match=r"wiki\.(valid|test)\.tokens: sha256"):
        prepare(DataConfig(name="wikitext-103", url=f"{base}/wt.zip"), progress=False)


def test_download_404(http_dir, data_root):
    _, base = http_dir
    cfg = DataConfig(name="wikitext-103", url=f"{base}/missing.zip", verify_sha256=False)
    with pytest.raises(DataError, match=r"download of .*/missing\.zip failed: HTTP 404"):
        load_corpus(cfg, progress=False)
    raw = data_root / "raw" / "wikitext-103"
    assert not any(raw.iterdir())
    assert no_cache(data_root, "wikitext-103")


def test_download_corrupt_zip(http_dir, data_root):
    folder, base = http_dir
    make_wt103_zip(folder / "good.zip")
    blob = (folder / "good.zip").read_bytes()
    (folder / "truncated.zip").write_bytes(blob[: len(blob) // 2])
    cfg = DataConfig(name="wikitext-103", url=f"{base}/truncated.zip", verify_sha256=False)
    with pytest.raises(DataError, match=r"truncated\.zip .* is not a valid zip"):
        load_corpus(cfg, progress=False)
    raw = data_root / "raw" / "wikitext-103"
    assert not any(raw.iterdir())  # no zip, no temp files, no split files
    assert no_cache(data_root, "wikitext-103")

    # Damaged member data (CRC mismatch) is caught during extraction, leaving nothing behind.
    damaged = folder / "crc.zip"
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("wikitext-103/wiki.train.tokens", "the cat sat\n" * 10)
    blob = bytearray(damaged.read_bytes())
    blob[blob.index(b"the cat sat")] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="is not a valid zip"):
        D.download(f"{base}/crc.zip", raw, progress=False)
    assert not any(raw.iterdir())


def test_concurrent_prepare(data_root):
    """Two processes preparing the same cache at once: one builds, the other waits and reuses it."""
    code = (
        "from micronet.data import DataConfig, load_corpus\n"
        "c = load_corpus(DataConfig(), progress=False)\n"
        "print(c.manifest['tokens']['train'], c.vocab_size)\n"
    )
    env = {**os.environ, "MICRONET_DATA": str(data_root)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.split() == [str(WT2_COUNTS["train"]), str(WT2_VOCAB)]
    assert no_temp_files(data_root)


def test_download_cut_short(http_dir, data_root):
    _, base = http_dir
    with pytest.raises(DataError, match=r"short\.zip stopped after 10 of 1000 bytes"):
        D.download(f"{base}/short.zip", data_root / "dl", progress=False)
    assert not any((data_root / "dl").iterdir())
