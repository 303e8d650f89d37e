"""Reliability (issue 8), storage faults: a full disk (injected, and a real tmpfs when root), damaged
checkpoints, torn CSV rows, temp files of killed processes, a log that cannot be written."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from conftest import compose_cfg
from micronet import train
from micronet.runs import files, results
from micronet.runs.config import MicronetError
from micronet.runs.results import CheckpointError, RunDir, WriteError, truncate_csv
from test_reliability import TRAIN, assert_same_run, guard_is_free, start, tail, temp_files  # noqa: F401


# ----------------------------------------------------------------------------- a full disk


def full_disk(monkeypatch, when: Callable[[Path], bool]) -> None:
    """ENOSPC for files matching ``when``: half the data reaches the disk, then the write fails."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, *a, **k):
        f = real_open(path, *a, **k)
        return Full(f) if when(Path(path)) else f

    for module in (results, files):  # their writes only (atomic writes live in micronet.runs.files)
        monkeypatch.setattr(module, "open", fake_open, raising=False)


@pytest.mark.parametrize("target", ["checkpoint", "csv", "config"])
def test_a_full_disk_fails_cleanly_and_keeps_the_previous_files(results_root, monkeypatch, target):
    args = [*TRAIN, "train.stop_after=4"]
    train.run(compose_cfg("train", ["name=d", *args]))  # checkpoints 2, 4; row 3
    rd = RunDir("d")
    kept = [*rd.models_dir.iterdir(), *([rd.config_path] if target == "config" else [])]
    before = {p: p.read_bytes() for p in kept}
    hit = {"checkpoint": lambda p: p.name.startswith(".model-6.pt.tmp"), "csv": lambda p: p == rd.train_csv,
           "config": lambda p: p.name.startswith(".config.yaml.tmp")}[target]
    full_disk(monkeypatch, hit)
    with pytest.raises(MicronetError) as e:
        train.run(compose_cfg("train", ["name=d", *TRAIN]))
    msg = str(e.value)
    assert "\n" not in msg
    if target == "checkpoint":
        assert isinstance(e.value, CheckpointError) and msg == (
            f"no space left on device while writing {rd.checkpoint_path(6)}; "
            f"the previous checkpoint {rd.checkpoint_path(4)} is intact")
    elif target == "csv":
        assert isinstance(e.value, WriteError) and msg == f"no space left on device while appending to {rd.train_csv}"
        assert not rd.train_csv.read_text().endswith("\n")  # half a row: a torn line
    else:
        assert msg == f"no space left on device while writing {rd.config_path}; the previous config.yaml is intact"
    assert not temp_files(rd.path) and guard_is_free(rd)
    assert rd.load()["step"] == 4 and rd.steps() == [2, 4]
    for p, data in before.items():
        assert p.read_bytes() == data, p
    for module in (results, files):  # space again: the run resumes and ends as if whole
        monkeypatch.setattr(module, "open", open, raising=False)
    train.run(compose_cfg("train", ["name=d", *TRAIN]))
    train.run(compose_cfg("train", ["name=whole", *TRAIN]))
    assert_same_run(RunDir("whole"), rd, 6)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 7 MB filesystem (room for two 2.7 MB tiny checkpoints, not three); root only."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mnt)], capture_output=True)
    except OSError as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_really_full_disk_through_the_cli(tiny_tmpfs, monkeypatch, tmp_path):
    monkeypatch.setenv("MICRONET_RESULTS", str(tiny_tmpfs))
    args = ["name=full", *TRAIN]  # checkpoints at 2, 4, 6 of 2.7 MB each
    out, err = tmp_path / "out", tmp_path / "err"
    p = start("micronet.train", args, out, err)
    assert p.wait(timeout=300) == 2, tail(err)
    rd = RunDir("full")
    lines = err.read_text().strip().splitlines()
    assert lines[-1] == (f"micronet.train: error: no space left on device while writing {rd.checkpoint_path(6)}; "
                         f"the previous checkpoint {rd.checkpoint_path(4)} is intact")
    assert "Traceback" not in err.read_text() and not temp_files(rd.path) and guard_is_free(rd)
    assert rd.load()["step"] == 4
    rd.checkpoint_path(2).unlink()  # make room: the same command resumes from 4 and finishes
    p = start("micronet.train", args, out, err)
    assert p.wait(timeout=300) == 0, tail(err)
    assert rd.steps() == [4, 6]


# ----------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_newest_checkpoint_is_skipped_on_resume(results_root, caplog, damage):
    train.run(compose_cfg("train", ["name=c", *TRAIN, "train.stop_after=4"]))  # checkpoints 2, 4; row 3
    path = RunDir("c").checkpoint_path(4)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit of rot
    path.write_bytes(bytes(data[: len(data) - 1000] if damage == "truncate" else b"" if damage == "empty" else data))
    train.run(compose_cfg("train", ["name=c", *TRAIN]))
    assert f"skipping damaged checkpoint: {path}" in caplog.text
    assert f"resumed {RunDir('c').path} from step 2" in caplog.text
    train.run(compose_cfg("train", ["name=whole", *TRAIN]))
    assert_same_run(RunDir("whole"), RunDir("c"), 6)  # step 4 redone: the damaged file replaced


def test_truncate_csv_drops_torn_and_damaged_rows(results_root):
    rd = RunDir("csv")
    rd.path.mkdir(parents=True)
    for step in (3, 6, 9):
        results.append_csv_row(rd, {k: step for k in results.CSV_FIELDS})
    good = rd.train_csv.read_text()
    with open(rd.train_csv, "a") as f:
        f.write("12,24,1.5")  # torn: the process died mid-append
    truncate_csv(rd, 100)
    assert rd.train_csv.read_text() == good
    lines = good.splitlines(keepends=True)
    rd.train_csv.write_text("".join([lines[0], "x,y\r\n", *lines[1:]]))  # a damaged row in the middle
    truncate_csv(rd, 6)
    assert rd.train_csv.read_text() == "".join(lines[:3])
    results.append_csv_row(rd, {k: 9 for k in results.CSV_FIELDS})
    assert rd.train_csv.read_text() == good
    with open(rd.train_csv, "a") as f:
        f.write("st")
    truncate_csv(rd, 6)  # never glue a new row onto a torn one
    assert rd.train_csv.read_text() == "".join(lines[:3])


def test_half_written_checkpoints_of_a_killed_process_are_removed(results_root, caplog):
    rd = RunDir("h")
    rd.models_dir.mkdir(parents=True)
    (rd.models_dir / ".model-8.pt.tmp4242").write_bytes(b"MICRONET" + b"x" * 100)
    (rd.models_dir / "model-6.pt").write_bytes(b"keep")
    with rd.guard("train"):
        pass
    assert [p.name for p in rd.models_dir.iterdir()] == ["model-6.pt"]
    assert f"removed {rd.models_dir / '.model-8.pt.tmp4242'} (108 bytes), half-written by a killed process" \
        in caplog.text


def test_a_log_file_on_a_full_disk_warns_once_and_logging_goes_on(tmp_path, capsys):
    from micronet.runs.cli import _LogFile, setup_logging

    setup_logging(tmp_path / "stage.log")
    handler = next(h for h in logging.getLogger().handlers if isinstance(h, _LogFile))

    def full(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    handler.stream.write = full
    for i in range(3):
        logging.getLogger("micronet.test").info("record %d", i)
    err = capsys.readouterr().err
    assert err.count(f"micronet: warning: cannot write the log {tmp_path / 'stage.log'} (No space left on device); "
                     "logging to stderr only") == 1
    assert "record 2" in err and "Traceback" not in err and "Logging error" not in err
    setup_logging(None)  # closing the broken handler is quiet too


def test_a_full_disk_when_taking_the_guard_is_one_line(results_root, monkeypatch):
    rd, real = RunDir("g"), os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(WriteError, match=f"^no space left on device while writing {rd.path / '.guard'}$"):
        with rd.guard("train"):
            pass
    monkeypatch.setattr(os, "pwrite", real)
    assert guard_is_free(rd)


def test_soft_labels_on_a_full_disk_stop_cleanly_and_resume_exactly(tmp_path, monkeypatch):
    from micronet.training.soft_labels import SoftLabelError, generate_soft_labels
    from test_soft_labels import META, tiny_lm, tokens

    model, toks, args = tiny_lm(), tokens(300), dict(chunk_len=20, block_tokens=60)  # 3 chunks a block
    generate_soft_labels(model, toks, tmp_path / "whole", 6, META, **args)
    out, real, calls = tmp_path / "parts", os.pwrite, [0]

    def pwrite(fd, data, offset):  # ids and probs once per chunk: the 9th write is chunk 5's ids
        calls[0] += 1
        if calls[0] == 9:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(SoftLabelError) as e:
        generate_soft_labels(model, toks, out, 6, META, **args)
    assert str(e.value) == (f"no space left on device while writing {out / 'ids.npy'}; the rows recorded in "
                            "manifest.json are kept: make room and run the same command again to resume")
    monkeypatch.setattr(os, "pwrite", real)
    assert json.loads((out / "manifest.json").read_text())["rows_done"] == 61 and not temp_files(out)
    generate_soft_labels(model, toks, out, 6, META, **args)
    for f in ("ids.npy", "probs.npy"):
        assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f


def test_a_run_whose_every_checkpoint_is_damaged_is_refused_untouched(results_root):
    train.run(compose_cfg("train", ["name=c", *TRAIN, "train.stop_after=4"]))
    rd = RunDir("c")
    for s in rd.steps():
        rd.checkpoint_path(s).write_bytes(rd.checkpoint_path(s).read_bytes()[:-1])
    before = {p: p.read_bytes() for p in rd.models_dir.iterdir()}
    with pytest.raises(CheckpointError, match=f"^c has no usable checkpoint in {rd.models_dir}$"):
        train.run(compose_cfg("train", ["name=c", *TRAIN]))
    assert {p: p.read_bytes() for p in rd.models_dir.iterdir()} == before  # not silently restarted from 0


def test_results_without_weights_of_an_experiment_say_how_to_train_them(results_root):
    """Committed results files but no checkpoint (a withdrawn release, say): the error names the command."""
    rd = RunDir("wt2ref_8.3M")  # an experiment of conf/experiment/
    rd.models_dir.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"^wt2ref_8\.3M has no usable checkpoint in .*; train it with "
                                              r"python -m micronet\.train experiment=wt2ref_8\.3M$"):
        rd.load()
    with pytest.raises(CheckpointError, match=r"^not_an_experiment has no usable checkpoint in \S+$"):
        RunDir("not_an_experiment").load()
