"""Issue 19: the rough edges a new user met, each at the command line as the user meets it.

Every case asserts the one line the user reads, the exit code, and that nothing was created or damaged
(snapshots of the results and data roots). CLI start-up (~3 s) dominates, so independent cases run as
parallel subprocesses.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_MODEL, compose_cfg, run_cli
from micronet import train
from micronet.runs.config import typed
from micronet.data.corpus import DataConfig, load_corpus
from micronet.data.fetch import sha256_file
from micronet.report import collect_runs, runs_table
from micronet.runs.results import RunDir, load_checkpoint_file, save_checkpoint
from micronet.training.config import OptimConfig, lr_at
from test_bad_input import LOG_LINE, snapshot, train_args
from test_soft_labels import tiny_env, write_tiny_corpus  # noqa: F401 (fixture)

SHORT = ["train.steps=4", "train.batch_size=2", "train.chunk_len=32", "train.eval_every=4", "train.save_every=4",
         "train.val_tokens=100", "train.eval_chunk_len=64", "optim.warmup_steps=1", "train.threads=1"]


def parallel(cases: list[tuple[str, list[str]]]) -> list[subprocess.CompletedProcess]:
    """Run ``python -m micronet.<stage> args`` for every case at once; their results in order."""
    procs = [subprocess.Popen([sys.executable, "-m", f"micronet.{m}", *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd="/") for m, a in cases]
    out = []
    for p, (m, a) in zip(procs, cases):
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess([m, *a], p.returncode, stdout, stderr))
    return out


def error_lines(stderr: str) -> list[str]:
    """What the user reads besides the stage's log records."""
    return [line for line in stderr.splitlines() if not LOG_LINE.match(line)]


def unguarded(snap: dict) -> dict:
    """A snapshot without ``.guard`` files (a guard is written and emptied by every guarded start)."""
    return {p: v for p, v in snap.items() if p.name != ".guard"}


# ---------------------------------------------------------------- items 1 and 6: a failed start


@pytest.mark.slow
def test_a_failed_start_is_one_line_and_leaves_nothing_behind(tiny_env, tmp_path, results_root):
    """Unavailable devices, a bad model size, missing data: one line, exit 2, no results/<name>/, no new
    file anywhere (item 6), for train and the stages that create or log into a results directory."""
    train.run(compose_cfg("train", train_args("t", tiny_env, "tiny")))  # a run for the other stages; its data cache
    no_test = tmp_path / "raw_notest"
    write_tiny_corpus(no_test).joinpath("wiki.test.tokens").unlink()
    no_cuda = r"( \(this torch has no CUDA support\))?"
    cuda = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"  # never there
    cases = [  # (stage, args, the one line after "micronet.<stage>: error: ")
        ("train", [*train_args("a", tiny_env, "tiny"), f"train.device={cuda}"],
         rf"device '{cuda}' is not available{no_cuda}; available: auto, cpu.*"),
        ("train", [*train_args("b", tiny_env, "tiny"), "train.device=gpu"],
         r"device 'gpu' is not available; available: auto, cpu.*"),
        ("train", [*train_args("c", tiny_env, "tiny"), "model.d_model=0"],
         r"model\.d_model must be a positive integer, got 0"),
        ("train", [*train_args("f", tiny_env, "tiny"), "train.chunk_len=100000"],
         r"train split has \d+ tokens, fewer than chunk_len \+ 1 = 100001"),
        ("train", train_args("d", no_test, "notest"),
         re.escape(f"{no_test / 'wiki.test.tokens'}: split file not found; put it there or point data.raw_dir at "
                   "its folder")),
        ("train", train_args("e", tmp_path / "no_such_folder", "nofolder"),
         r".*no_such_folder/wiki\.\w+\.tokens: split file not found.*"),
        ("evaluate", ["name=t", "device=cuda:9"],
         rf"device 'cuda:9' is not available{no_cuda}; available: auto, cpu.*"),
        ("cache_search", ["name=t", "n_cache=10", f"device={cuda}"], rf"device '{cuda}' is not available{no_cuda}.*"),
        ("prune", ["name=t", "prune=uniform", "prune.target=0.5", "prune.every=1", "prune.rounds=1", "train.steps=2",
                   f"train.device={cuda}"], rf"device '{cuda}' is not available{no_cuda}.*"),
        ("quantize", ["name=t", "bits=8", f"device={cuda}"], rf"device '{cuda}' is not available{no_cuda}.*"),
    ]
    roots = (results_root, tmp_path / "data")
    before = snapshot(*roots)
    wrong = []
    for r, (stage, args, pattern) in zip(parallel([(m, a) for m, a, _ in cases]), cases):
        lines = error_lines(r.stderr)
        if r.returncode != 2 or len(lines) != 1 or not re.fullmatch(rf"micronet\.{stage}: error: {pattern}", lines[0]):
            wrong.append((stage, args[-1], r.returncode, r.stderr[-1500:]))
    assert not wrong, "\n\n".join(map(str, wrong))
    assert snapshot(*roots) == before  # nothing new, nothing touched: no results/<name>/, guard, log or cache
    assert sorted(p.name for p in results_root.iterdir()) == ["t"]


# ---------------------------------------------------------------- items 2 and 7: one's own corpus


@pytest.mark.slow
def test_the_default_model_trains_on_a_small_vocabulary(tiny_env, tmp_path, results_root):
    """The default model's cutoffs [2000, 10000] follow a 2,500-word vocabulary (the rarest bin dropped, one
    line) and a 60-word one (one plain softmax); config.yaml and the checkpoint record the cutoffs used; the
    first log line names the real results path (item 7); the same command resumes the same model."""
    small = write_tiny_corpus(tmp_path / "raw2500", n_words=2500, n_lines=400)
    for split in ("train", "valid", "test"):  # the README's worked command: one's own file names
        (small / f"wiki.{split}.tokens").rename(small / f"{split}.txt")
    own = [f"data.raw_dir={small}", "data.name=mine", *(f"data.{s}_file={s}.txt" for s in ("train", "valid", "test"))]
    args = {"v2500": ["name=v2500", *own, *SHORT],  # the default model (wt2_small)
            "v60": ["name=v60", f"data.raw_dir={tiny_env}", "data.name=tiny", *TINY_MODEL, *SHORT]}
    first = dict(zip(args, parallel([("train", a) for a in args.values()])))
    expect = {"v2500": ("2,500", [2000], [128, 32]), "v60": ("60", [], [16])}
    for name, r in first.items():
        assert r.returncode == 0, r.stderr[-2000:]
        words, cutoffs, dims = expect[name]
        fitted = [line for line in r.stderr.splitlines() if "do not fit" in line]
        assert len(fitted) == 1 and fitted[0].endswith(
            f"model.cutoffs [2000, 10000] do not fit a vocabulary of {words} words: using cutoffs {cutoffs}, "
            f"bin_dims {dims} (the rarest bins dropped)"), r.stderr
        rd = RunDir(name)
        assert f": training {rd.path}: " in r.stderr  # the real path, not results/<name>
        model = OmegaConf.load(rd.config_path).model
        assert (list(model.cutoffs), list(model.bin_dims)) == (cutoffs, dims)
        ckpt = rd.load(4)
        assert (ckpt["model_config"]["cutoffs"], ckpt["model_config"]["bin_dims"]) == (cutoffs, dims)
    again = run_cli("micronet.train", *args["v60"])  # finished: the same command resumes and stops at once
    assert again.returncode == 0 and again.stdout.strip() == f"stopped at step 4; results in {RunDir('v60').path}"
    ev = run_cli("micronet.evaluate", "name=v60", "splits=[test]")  # the one-bin model evaluates too
    assert ev.returncode == 0, ev.stderr[-1500:]


def test_explicit_vocab_size_keeps_the_cutoffs_error(tiny_env):
    with pytest.raises(Exception, match=r"model\.cutoffs must increase strictly below vocab_size=60"):
        train.run(compose_cfg("train", ["name=x", f"data.raw_dir={tiny_env}", "data.name=tiny", *TINY_MODEL,
                                        "model.vocab_size=60", *SHORT]))


# ---------------------------------------------------------------- item 3: two corpora, one data.name


@pytest.mark.slow
def test_two_corpora_under_one_name_never_share_a_cache(tiny_env, tmp_path, results_root):
    other = write_tiny_corpus(tmp_path / "other", seed=7)  # the same file names and vocabulary size, other text
    data = tmp_path / "data" / "cache"
    ra = run_cli("micronet.train", *train_args("a", tiny_env, "mine"))
    assert ra.returncode == 0, ra.stderr[-1500:]
    a_cache = snapshot(data / "mine")
    rb = run_cli("micronet.train", *train_args("b", other, "mine"))
    assert rb.returncode == 0, rb.stderr[-1500:]
    assert snapshot(data / "mine") == a_cache  # a's cache untouched
    keyed = [p.name for p in data.iterdir() if p.name != "mine"]
    assert len(keyed) == 1 and re.fullmatch(r"mine-[0-9a-f]{12}", keyed[0]), keyed
    for name, folder in (("a", tiny_env), ("b", other)):
        recorded = OmegaConf.to_container(OmegaConf.load(RunDir(name).config_path).corpus)
        sums = {s: sha256_file(folder / f"wiki.{s}.tokens") for s in ("train", "valid", "test")}
        assert recorded["name"] == "mine" and recorded["raw_dir"] == str(folder) and recorded["sha256"] == sums
        assert RunDir(name).load(4)["corpus"] == recorded
    corpus_a = load_corpus(DataConfig(name="mine", raw_dir=str(tiny_env)), progress=False)  # still a's, no rebuild
    assert corpus_a.manifest["files"]["train"]["sha256"] == sha256_file(tiny_env / "wiki.train.tokens")
    assert snapshot(data / "mine") == a_cache


# ---------------------------------------------------------------- item 4: score without an eval file


@pytest.mark.slow
def test_score_without_eval_file_warns_once_and_the_table_says_missing(tiny_env, results_root):
    train.run(compose_cfg("train", train_args("t", tiny_env, "tiny")))
    before = snapshot(results_root)
    r = run_cli("micronet.score", "name=t")
    assert r.returncode == 0, r.stderr[-1500:]
    warnings = [line for line in r.stderr.splitlines() if " WARNING " in line]
    path = RunDir("t").eval_path(4)
    assert len(warnings) == 1 and warnings[0].endswith(
        f": no test perplexity: {path} has no test split with cache 0 (run python -m micronet.evaluate "
        "name=t step=4 first); score_step4.json records test_ppl null"), r.stderr
    assert "test ppl missing" in r.stderr and "test ppl None" not in r.stderr
    assert json.loads(RunDir("t").score_path(4).read_text())["test_ppl"] is None
    after = snapshot(results_root)
    assert {p: after[p] for p in before} == before
    assert sorted(p.name for p in set(after) - set(before)) == ["score.log", "score_step4.json"]
    header, _, row = runs_table(collect_runs(), "text").splitlines()[:3]
    cells = dict(zip(re.split(r"\s{2,}", header), re.split(r"\s{2,}", row.strip())))
    assert cells["test ppl"] == "missing" and cells["val ppl"] == "missing", (header, row)
    assert re.fullmatch(r"[\d.,]+ \(first \d+ tokens, no cache\)", cells["last training validation"]), (header, row)


# ---------------------------------------------------------------- item 5: resuming with another schedule


@pytest.mark.slow
def test_resuming_with_other_steps_is_refused_unless_extended(tiny_env, results_root):
    first = run_cli("micronet.train", *train_args("t", tiny_env, "tiny"), "train.stop_after=2", "train.save_every=2")
    assert first.returncode == 0, first.stderr[-1500:]
    sliced = run_cli("micronet.train", *train_args("t", tiny_env, "tiny"), "train.stop_after=3", "train.save_every=2")
    assert sliced.returncode == 0 and RunDir("t").latest_step() == 4  # stop_after is no schedule change
    rd = RunDir("t")
    before = unguarded(snapshot(results_root))
    refused = run_cli("micronet.train", *train_args("t", tiny_env, "tiny"), "train.steps=8")
    assert refused.returncode == 2 and error_lines(refused.stderr) == [
        f"micronet.train: error: {rd.path} was planned for train.steps=4 (its learning-rate schedule depends on it), "
        "not 8: resume with train.steps=4, or add train.extend=true to continue under the schedule of 8 steps"]
    assert unguarded(snapshot(results_root)) == before  # config.yaml, CSV, checkpoints untouched

    # A checkpoint older than this check (no train_steps): config.yaml's train.steps is the plan.
    old = load_checkpoint_file(rd.checkpoint_path(4))
    del old["train_steps"], old["format"]
    save_checkpoint(rd.checkpoint_path(4), old)
    assert run_cli("micronet.train", *train_args("t", tiny_env, "tiny"), "train.steps=8").returncode == 2

    extended = run_cli("micronet.train", *train_args("t", tiny_env, "tiny"), "train.steps=8", "train.extend=true")
    assert extended.returncode == 0, extended.stderr[-1500:]
    optim = typed(OptimConfig, compose_cfg("train", train_args("t", tiny_env, "tiny")).optim, "optim")
    assert (f"WARNING micronet.training.trainer: train.extend: train.steps 4 -> 8 from step 4: the next learning rate is "
            f"{lr_at(4, optim, 8):.4g} instead of {lr_at(4, optim, 4):.4g} and the cosine reaches optim.min_lr at "
            "step 8 instead of 4") in extended.stderr
    assert OmegaConf.load(rd.config_path).train.steps == 8 and rd.load(8)["train_steps"] == 8
    with open(rd.train_csv, newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert int(last["step"]) == 8 and float(last["lr"]) == pytest.approx(lr_at(7, optim, 8))
    again = run_cli("micronet.train", *train_args("t", tiny_env, "tiny"), "train.steps=8")  # now planned for 8
    assert again.returncode == 0 and again.stdout.strip() == f"stopped at step 8; results in {rd.path}"


# ---------------------------------------------------------------- item 8: the tuned allocator without a variable

_MMAPS = """
import ctypes, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.malloc.argtypes = Info, ctypes.c_void_p, [ctypes.c_size_t]
{setup}
before = libc.mallinfo2().hblks
libc.malloc(64 << 20)  # 64 MiB: glibc's default malloc maps it with mmap, the tuned one takes it from the heap
print(libc.mallinfo2().hblks - before)
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        import ctypes

        ctypes.CDLL(None).mallinfo2  # noqa: B018
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_stages_tune_malloc_at_start_up_without_the_variable():
    tunables = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
    tune = "from micronet.runs.allocator import tune_malloc\nprint(tune_malloc())"
    cases = {  # (setup code, extra env) -> expected output
        ("import micronet.runs.cli, micronet.train", ()): ["1"],  # importing changes nothing
        (tune, ()): ["mallopt", "0"],
        (tune, (("GLIBC_TUNABLES", tunables),)): ["GLIBC_TUNABLES", "0"],  # the user's own setting wins
        (tune, (("MICRONET_MALLOPT", "0"),)): ["off (MICRONET_MALLOPT=0)", "1"],
    }
    base = {k: v for k, v in __import__("os").environ.items() if k not in ("GLIBC_TUNABLES", "MICRONET_MALLOPT")}
    for (setup, env), expected in cases.items():
        r = subprocess.run([sys.executable, "-c", _MMAPS.format(setup=setup)], capture_output=True, text=True,
                           env={**base, **dict(env)}, timeout=120)
        assert r.returncode == 0 and r.stdout.split("\n")[:-1] == expected, (setup, env, r.stdout, r.stderr[-800:])
    # Every stage's entry point calls it before anything else (here: before a one-line error).
    code = ("import micronet.runs.cli as c, sys\nt = c.tune_malloc\nc.tune_malloc = lambda: print('tuned:', t())\n"
            "import micronet.train\nsys.argv = ['train', 'name=x', 'train.device=gpu']\nmicronet.train.main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=base, timeout=120, cwd="/")
    assert r.returncode == 2 and r.stdout == "tuned: mallopt\n", (r.stdout, r.stderr[-800:])
