"""The notebooks run headless (nbclient) on a tiny pipeline and offline data; committed copies are clean."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg
from micronet.runs.paths import PROJECT_ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
NOTEBOOKS = ("setup_data.ipynb", "evaluate.ipynb")


@pytest.fixture(scope="session")
def kernel(tmp_path_factory) -> str:
    """A ``python3`` kernelspec for this very interpreter, first on JUPYTER_PATH.

    Installed into a temp prefix so the test neither depends on nor touches the machine's Jupyter
    set-up (a clean CI machine has only ``pip install -e '.[test]'``; another python3 spec on the
    machine could point at an interpreter without micronet).
    """
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(prefix=str(prefix), kernel_name="python3", display_name="Python 3 (micronet tests)")
    spec = json.loads((prefix / "share/jupyter/kernels/python3/kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        mp.setenv("JUPYTER_PLATFORM_DIRS", "1")  # silence jupyter_core's platformdirs deprecation warning
        yield "python3"


def run_notebook(name: str, params: dict, cwd: Path, kernel: str):
    """Execute ``name`` with ``params`` assigned in a cell after the one tagged ``parameters``."""
    nb = nbformat.read(PROJECT_ROOT / name, as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items())))
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(cwd)}}).execute()
    print(f"{name} ran in {time.perf_counter() - t0:.1f} s")
    return nb


def outputs(nb, kind: str = "text") -> str:
    """All stream/text output of the executed notebook (``kind="png"``: count of images)."""
    if kind == "png":
        return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                         + o.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_are_clean(name):
    nb = nbformat.read(PROJECT_ROOT / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"strip the outputs of {name}"
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell holds the parameters"
    assert nb.metadata.kernelspec.name == "python3"


def test_setup_data_notebook_offline_wikitext2(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("MICRONET_DATA", str(tmp_path / "data"))  # re-extract and re-prepare from scratch
    nb = run_notebook("setup_data.ipynb", {}, tmp_path, kernel)
    text = outputs(nb)
    for figure in ("2,088,628", "217,646", "245,569", "33,278", "official"):
        assert figure in text
    assert "adaptive-softmax bins of model wt2_8.3M (cutoffs [3500, 15000])" in text  # a WikiText-2 model's bins
    manifest = json.loads((tmp_path / "data/cache/wikitext-2/manifest.json").read_text())
    assert manifest["tokens"] == {"train": 2088628, "valid": 217646, "test": 245569}


def test_setup_data_notebook_local_wikitext103_like_folder(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("MICRONET_DATA", str(tmp_path / "data"))
    local = tmp_path / "wt103"
    local.mkdir()
    (local / "wiki.train.tokens").write_text("the cat sat on the mat\n\n= a title =\nthe dog sat\n" * 50)
    (local / "wiki.valid.tokens").write_text("the cat sat\n\nthe dog\n")
    (local / "wiki.test.tokens").write_text("= a title =\non the mat\n")
    nb = run_notebook("setup_data.ipynb", {"DATASET": "wikitext-103", "LOCAL_DIR": str(local), "VERIFY": False,
                                           "DOWNLOAD": False}, tmp_path, kernel)
    text = outputs(nb)
    assert "not listed" in text and "DIFFERENT" in text  # fake valid/test are not the official files
    manifest = json.loads((tmp_path / "data/cache/wikitext-103/manifest.json").read_text())
    assert manifest["tokens"] == {"train": 50 * 17, "valid": 8, "test": 9}
    assert manifest["source_dir"] == str(tmp_path / "data/raw/wikitext-103")  # where training looks


def write_tiny_corpus(folder: Path, seed: int = 0) -> None:
    """A Zipf-ish 80-word corpus: evaluation of a tiny model over it takes milliseconds."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(80)]
    weights = [1 / (i + 1) for i in range(80)]
    folder.mkdir(parents=True)
    for split, n_lines in (("train", 400), ("valid", 40), ("test", 40)):
        lines = [" ".join(rng.choices(words, weights, k=rng.randint(0, 20))) for _ in range(n_lines)]
        if split == "train":
            lines.append(" ".join(words))  # every word occurs in train
        (folder / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n")


@pytest.fixture
def tiny_results(results_root, tmp_path, monkeypatch):
    """A trained, evaluated and scored tiny run, plus a pruned-looking child with only a log."""
    from micronet import evaluate, score, train

    monkeypatch.setenv("MICRONET_DATA", str(tmp_path / "data"))
    write_tiny_corpus(tmp_path / "corpus")
    data = ["data.name=tiny", f"data.raw_dir={tmp_path / 'corpus'}", "model.cutoffs=[20,50]"]
    train.run(compose_cfg("train", ["name=tiny", *TINY_MODEL, *TINY_TRAIN, *data]))
    evaluate.run(compose_cfg("evaluate", ["name=tiny"]))
    score.run(compose_cfg("score", ["name=tiny"]))
    child = results_root / "prune0.5_tiny"
    child.mkdir()
    (child / "config.yaml").write_text("name: prune0.5_tiny\nlineage: {parent: tiny, parent_step: 6, stage: prune}\n")
    (child / "train_results.csv").write_text((results_root / "tiny/train_results.csv").read_text())
    return results_root


def test_evaluate_notebook_on_a_tiny_pipeline(kernel, tiny_results, tmp_path):
    plot = tmp_path / "plots" / "ppl_vs_score.png"
    nb = run_notebook("evaluate.ipynb", {"RESULTS_ROOT": str(tiny_results), "SAVE_PLOT": str(plot)}, tmp_path, kernel)
    text = outputs(nb)
    assert "| tiny | - | 6 | tiny | none |" in text and "| prune0.5_tiny | tiny | 6 | tiny |" in text  # dataset column
    assert "prune0.5_tiny: no score_step6.json; no eval_step6.json" in text  # step 6 from its log
    assert "paper score" in text and "strict score" in text and "last training validation" in text
    assert outputs(nb, "png") == 4  # components, ppl vs score, sweep, training curves (what they show: test_report*)
    assert plot.is_file() and plot.stat().st_size > 0
