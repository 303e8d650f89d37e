"""micronet.report: run collection with missing pieces, tables, plots, data set-up and statistics."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from micronet import report
from micronet.data.corpus import Corpus
from micronet.data.fetch import DataError
from micronet.model.transformer import ModelConfig
from micronet.runs.config import MicronetError
from micronet.runs.paths import shared_data_dir
from micronet.scoring.counts import ModelCounts, bin_fractions, score

CFG = ModelConfig(vocab_size=100, d_model=16, n_layer=2, n_head=2, d_head=8, d_ff=32, n_seq=8, segment_len=8,
                  cutoffs=[20, 50], bin_dims=[16, 8, 4])
CSV = "step,tokens,train_loss,val_loss,val_ppl,lr,tokens_per_s,elapsed_s\n"


def score_json(name: str, step: int, test_ppl: float | None, density: float = 1.0, both: bool = True) -> dict:
    """What ``python -m micronet.score`` writes, for a small model (no training needed)."""
    counts = ModelCounts.from_config(CFG, {"layers.0.ffn.0.weight": density})
    res = {c: score(counts, bin_fractions=(0.7, 0.2, 0.1), convention=c) for c in ("paper", "strict")}
    out = {"name": name, "step": step, "test_ppl": test_ppl, **res["paper"].to_json()}
    if both:
        out["conventions"] = {c: {k: v for k, v in s.to_json().items() if k != "components"} for c, s in res.items()}
    return out


def make_run(root: Path, name: str, *, config: str | None = "name: x\n", ckpts=(), csv_rows=(), ev=None,
             sc=None) -> Path:
    run = root / name
    (run / "models").mkdir(parents=True)
    if config is not None:
        (run / "config.yaml").write_text(config)
    for s in ckpts:
        (run / "models" / f"model-{s}.pt").write_bytes(b"")
    if csv_rows:
        (run / "train_results.csv").write_text(CSV + "".join(f"{s},{s * 10},5.0,{np.log(p)},{p},0.001,100,1\n"
                                                             for s, p in csv_rows))
    for step, obj in (ev or {}).items():
        (run / f"eval_step{step}.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
    for step, obj in (sc or {}).items():
        (run / f"score_step{step}.json").write_text(json.dumps(obj))
    return run


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "results"
    make_run(root, "full", ckpts=(3, 6), csv_rows=[(3, 90.0), (6, 80.0)],
             ev={6: {"name": "full", "step": 6, "valid": {"ppl": 70.0, "cache": {"n_cache": 0}},
                     "test": {"ppl": 75.0, "cache": {"n_cache": 0}}}},
             sc={6: score_json("full", 6, 75.0)})
    make_run(root, "prune0.5_full", config="name: p\nlineage: {parent: full, parent_step: 6, stage: prune}\n",
             ckpts=(10,), csv_rows=[(10, 85.0)], sc={10: score_json("prune0.5_full", 10, None, density=0.5)})
    make_run(root, "old_score", config=None, ckpts=(2,), sc={2: {**score_json("old_score", 2, 99.0, both=False),
                                                                 "convention": "strict"}})
    make_run(root, "broken", config="lineage: [unclosed\n", ckpts=(4,), ev={4: "{not json"})
    make_run(root, "bare")
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("not a run")
    return root


def by_name(rows):
    return {r["name"]: r for r in rows}


def test_collect_runs_tolerates_missing_pieces(tree):
    rows = report.collect_runs(root=tree)
    assert [r["name"] for r in rows] == ["bare", "broken", "full", "old_score", "prune0.5_full"]
    r = by_name(rows)
    full = r["full"]
    assert (full["step"], full["val_ppl"], full["test_ppl"], full["ppl_source"]) == (6, 70.0, 75.0, "eval_step6.json")
    assert full["parent"] is None and full["notes"] == [] and full["bits"] == 32 and full["n_cache"] == 0
    sj = json.loads(Path(full["score_file"]).read_text())
    for c in ("paper", "strict"):
        assert full[f"{c}_score"] == sj["conventions"][c]["score"] and full[f"{c}_params"] > 0
    child = r["prune0.5_full"]
    assert (child["parent"], child["parent_step"], child["stage"], child["step"]) == ("full", 6, "prune", 10)
    assert (child["val_ppl"], child["ppl_source"], child["test_ppl"]) == (85.0, "train_results.csv", None)
    assert child["paper_ops"] < full["paper_ops"]
    old = r["old_score"]  # a score file without "conventions": only its own convention is known
    assert old["strict_score"] is not None and old["paper_score"] is None and old["test_ppl"] == 99.0
    assert "no config.yaml" in old["notes"]
    broken = r["broken"]
    assert broken["parent"] is None and broken["val_ppl"] is None and broken["paper_score"] is None
    assert broken["notes"] == ["config.yaml unreadable (ParserError)", "eval_step4.json unreadable (JSONDecodeError)",
                               "no score_step4.json"]
    bare = r["bare"]
    assert bare["step"] is None and bare["notes"] == ["no checkpoint, train_results.csv, eval or score file yet"]
    assert all(bare[k] is None for k in ("val_ppl", "paper_score"))


def test_collect_runs_mixes_sources_and_flags_cache_mismatch(tmp_path):
    make_run(tmp_path, "r", ckpts=(5,), csv_rows=[(5, 60.0)],
             ev={5: {"test": {"ppl": 65.0, "cache": {"n_cache": 3000}}}}, sc={5: score_json("r", 5, None)})
    (row,) = report.collect_runs(root=tmp_path)
    assert (row["val_ppl"], row["ppl_source"]) == (60.0, "train_results.csv")
    assert (row["test_ppl"], row["eval_n_cache"]) == (65.0, 3000)
    assert row["notes"] == ["ppl measured with cache 3000, score counts cache 0"]


def test_collect_runs_by_name_and_missing_root(tree, tmp_path):
    assert [r["name"] for r in report.collect_runs("full", root=tree)] == ["full"]
    with pytest.raises(MicronetError, match="no results directory"):
        report.collect_runs(["nope"], root=tree)
    assert report.collect_runs(root=tmp_path / "absent") == []


def test_runs_table_and_pick_run(tree):
    rows = report.collect_runs(["full", "prune0.5_full", "bare"], root=tree)
    md = report.runs_table(rows)
    lines = md.splitlines()
    assert lines[0].startswith("| run | parent | step | val ppl | test ppl |") and "strict score" in lines[0]
    full = by_name(rows)["full"]
    assert f"| full | - | 6 | 70.00 | 75.00 | 0 | 32 | {full['paper_params']:,.0f} |" in md
    assert f"{full['paper_score']:.6f}" in md and f"{full['strict_score']:.6f}" in md
    assert "| prune0.5_full | full | 10 | 85.00* | - |" in md and "* validation ppl" in md
    assert "| bare | - | - | - | - |" in md
    text = report.runs_table(rows, fmt="text").split("\n\n")[0].splitlines()
    assert len(text) == 5 and text[0].startswith("run ")
    assert report.pick_run(rows)["name"] == "prune0.5_full"  # lowest paper score
    assert report.pick_run(rows, "full")["name"] == "full"
    assert report.pick_run([by_name(rows)["bare"]]) is None
    with pytest.raises(MicronetError):
        report.pick_run(rows, "nope")
    notes = report.runs_notes(rows).splitlines()
    assert notes == ["prune0.5_full: no eval_step10.json",
                     "bare: no checkpoint, train_results.csv, eval or score file yet"]
    assert report.runs_notes(rows[:1]) == "nothing missing"


def test_plot_ppl_vs_score_has_runs_references_and_target(tree):
    rows = report.collect_runs(root=tree)
    fig = report.plot_ppl_vs_score(rows)
    ax = fig.axes[0]
    coll = {c.get_gid(): c for c in ax.collections if c.get_gid() in ("runs", "runs-val")}
    assert len(coll["runs"].get_offsets()) == 1  # full (test ppl)
    assert len(coll["runs-val"].get_offsets()) == 1  # prune0.5_full (validation ppl only)
    refs = [c for c in ax.collections if c.get_gid() == "reference"]
    assert sorted(tuple(c.get_offsets()[0]) for c in refs) == [(0.038747, 35.0), (0.047516, 35.0)]
    target = [ln for ln in ax.lines if ln.get_gid() == "ppl-target"]
    assert len(target) == 1 and list(target[0].get_ydata()) == [35.0, 35.0]
    assert {t.get_text() for t in ax.texts} == {"full", "prune0.5_full"}
    strict = report.plot_ppl_vs_score(rows, convention="strict", annotate=False).axes[0]
    runs = [c for c in strict.collections if (c.get_gid() or "").startswith("runs")]
    assert sum(len(c.get_offsets()) for c in runs) == 3  # old_score has only a strict score
    assert len([c for c in strict.collections if c.get_gid() == "reference"]) == 1
    with pytest.raises(ValueError, match="convention"):
        report.plot_ppl_vs_score(rows, convention="exact")


def test_plot_components_groups_layers(tree):
    rows = report.collect_runs(["full"], root=tree)
    sj = score_json("full", 6, 75.0)
    fig = report.plot_components(rows[0])
    ax_p, ax_o = fig.axes
    labels = [t.get_text() for t in ax_p.get_yticklabels()]
    assert "layers.*.qkv" in labels and not any(lab.startswith("layers.0") for lab in labels)
    assert len(labels) == len(set(labels))
    params = [b for b in ax_p.patches if b.get_gid() == "params"]
    assert sum(b.get_width() for b in params) == pytest.approx(sj["params"])
    assert sum(b.get_width() for b in ax_o.patches) == pytest.approx(sj["ops"])
    ungrouped = report.plot_components(rows[0]["score_file"], group_layers=False)
    assert len(ungrouped.axes[0].get_yticklabels()) > len(labels)
    empty = report.plot_components(None)
    assert "no scored run" in empty.axes[0].texts[0].get_text()


def test_training_curves_and_save_figure(tree, tmp_path):
    fig = report.plot_training_curves(None, root=tree)
    assert sorted(ln.get_label() for ln in fig.axes[0].lines) == ["full", "prune0.5_full"]
    assert list(fig.axes[0].lines[0].get_xdata()) == [3, 6]
    rows = report.collect_runs(["bare"], root=tree)
    assert "no train_results.csv" in report.plot_training_curves(rows).axes[0].texts[0].get_text()
    out = report.save_figure(fig, tmp_path / "sub" / "curves.png")
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    assert report.save_figure(fig, None) is None


def test_split_statistics_on_a_small_corpus():
    vocab = ["the", "<eos>", "<unk>", "a", "b", "c"]
    arr = {"train": np.array([0, 0, 1, 2, 3, 4, 5, 1], np.int32), "valid": np.array([0, 2, 2, 1], np.int32),
           "test": np.array([3, 1], np.int32)}
    corpus = Corpus(vocab=vocab, manifest={}, **arr)
    rows = report.split_statistics(corpus, cutoffs=(2, 4, 100))  # 100 >= vocab: dropped
    train, valid, test = rows
    assert (train["tokens"], train["lines"], train["types"], train["vocab"], train["unk"]) == (8, 2, 6, 6, 1)
    assert valid["unk_share"] == pytest.approx(0.5) and test["types"] == 2
    assert train["cutoffs"] == (2, 4)
    for r in rows:
        assert r["bin_fractions"] == pytest.approx(bin_fractions(arr[r["split"]], (2, 4), 6))
    text = report.format_split_statistics(rows)
    assert "bin [0,2) %" in text and "bin [4,V) %" in text and "50.00" in text
    with pytest.raises(ValueError, match="increasing"):
        report.split_statistics(corpus, cutoffs=(4, 2))


# ----------------------------------------------------------------------------- setup_data

LINES = {"train": "the cat sat on the mat\n\nthe dog sat\n" * 20, "valid": "the cat\n\nthe dog sat\n",
         "test": "on the mat\n"}


def fake_folder(path: Path, splits=("train", "valid", "test"), sums: bool = True) -> Path:
    path.mkdir(parents=True)
    for s in splits:
        (path / f"wiki.{s}.tokens").write_text(LINES[s])
    if sums:
        import hashlib

        digests = {s: hashlib.sha256((path / f"wiki.{s}.tokens").read_bytes()).hexdigest() for s in splits}
        (path / "SHA256SUMS").write_text("".join(f"{d}  wiki.{s}.tokens\n" for s, d in digests.items()))
    return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MICRONET_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_setup_data_copies_a_local_folder_where_training_reads(data_dir, tmp_path):
    src = fake_folder(tmp_path / "local")
    corpus = report.setup_data("wikitext-103", src, verify=False)
    assert corpus.manifest["source_dir"] == str(data_dir / "raw" / "wikitext-103")
    assert (data_dir / "raw/wikitext-103/wiki.valid.tokens").read_text() == LINES["valid"]
    assert len(corpus.train) == 20 * 12 and corpus.vocab[:2] == ["the", "<eos>"]
    status = {r["split"]: r["status"] for r in report.checksum_rows(corpus)}
    assert status == {"train": "not listed", "valid": "DIFFERENT", "test": "DIFFERENT"}
    with pytest.raises(DataError, match="does not match the official"):  # verify=True: micronet.data checks
        report.setup_data("wikitext-103", src)


def test_setup_data_refuses_a_corrupt_local_copy(data_dir, tmp_path):
    src = fake_folder(tmp_path / "local")
    (src / "wiki.test.tokens").write_text("on the mat mat\n")
    with pytest.raises(DataError, match="does not match .*SHA256SUMS"):
        report.setup_data("wikitext-103", src, verify=False)


def test_setup_data_without_train_says_it_must_be_downloaded(data_dir, tmp_path):
    src = fake_folder(tmp_path / "local", splits=("valid", "test"))
    with pytest.raises(DataError, match="train split must be downloaded from https://.*DOWNLOAD = True"):
        report.setup_data("wikitext-103", src, download=False, verify=False)
    with pytest.raises(DataError, match="missing wiki.valid.tokens"):
        report.setup_data("wikitext-103", fake_folder(tmp_path / "only_train", splits=("train",)), verify=False)


def test_setup_data_downloads_a_missing_train_split(data_dir, tmp_path):
    src = fake_folder(tmp_path / "local", splits=("valid", "test"))
    zpath = tmp_path / "wikitext-103-v1.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for s in ("train", "valid", "test"):
            zf.writestr(f"wikitext-103/wiki.{s}.tokens", LINES[s] + ("extra\n" if s == "test" else ""))
    corpus = report.setup_data("wikitext-103", src, url=zpath.as_uri(), verify=False)
    assert len(corpus.train) == 20 * 12
    assert (data_dir / "raw/wikitext-103/wiki.test.tokens").read_text() == LINES["test"]  # the local copy kept
    assert sorted(p.name for p in (data_dir / "raw/wikitext-103").iterdir()) == [
        "wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]


def test_setup_data_on_the_shared_wikitext103_copy(data_dir, tmp_path):
    shared = shared_data_dir() / "wikitext-103"
    if not (shared / "wiki.valid.tokens").is_file():
        pytest.skip(f"no shared WikiText-103 copy at {shared}")
    with pytest.raises(DataError, match="must be downloaded"):
        report.setup_data("wikitext-103", shared, download=False)
    # The shared copy with a stand-in train split (valid + test): official checksums verified.
    local = tmp_path / "wt103"
    local.mkdir()
    for s in ("valid", "test"):
        (local / f"wiki.{s}.tokens").write_bytes((shared / f"wiki.{s}.tokens").read_bytes())
    (local / "wiki.train.tokens").write_bytes((local / "wiki.valid.tokens").read_bytes()
                                              + (local / "wiki.test.tokens").read_bytes())
    corpus = report.setup_data("wikitext-103", local)
    assert (len(corpus.valid), len(corpus.test)) == (217646, 245569)
    status = {r["split"]: r["status"] for r in report.checksum_rows(corpus)}
    assert status == {"train": "not listed", "valid": "official", "test": "official"}


def test_data_config_follows_the_hydra_group():
    cfg = report.data_config("wikitext-103")
    assert cfg.url.endswith("wikitext-103-v1.zip") and cfg.raw_dir is None and cfg.verify_sha256
    assert report.data_config("wikitext-2", url="file:///x.zip", verify=False).url == "file:///x.zip"
    assert report.data_config("ptb").name == "ptb"
    with pytest.raises(DataError, match="invalid data set name"):
        report.data_config("../etc")
