"""No deprecated torch API: torch.ao.quantization, torch.ao.nn.quantized and the quantized dtypes
(pytorch/pytorch#184982) are on their way out, so the quantize stage (calibration and QAT), the packed
export, its loaders, the model export and the fast int8 path must run with their warnings as errors,
and the source must not name them."""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg
from micronet import quantize, train
from micronet.compress.checkpoint import load_model
from micronet.model.evaluation import evaluate_stream
from micronet.compress.checkpoint import load_export
from micronet.compress.export import same_weights
from micronet.compress.fast_infer import build_fast_model
from micronet.compress.release import export_model, load_exported
from micronet.runs.results import RunDir

FORBIDDEN = ("torch.ao.quantization", "torch.ao.nn.quantized", "quantize_per_", "qint8", "quint8", "qint32")
PACKAGE = Path(__file__).resolve().parents[1] / "micronet"
QUANT_TINY = ["quant.calib_batches=2", "quant.calib_chunk_len=32", "eval_splits=[]"]


@contextlib.contextmanager
def deprecations_are_errors():
    """DeprecationWarning, FutureWarning, and torch's UserWarnings about quantization or deprecation raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("error", message=r"(?is).*(quantiz|qint|quint|deprecat)", category=UserWarning)
        yield


def test_the_filters_catch_torchs_quantized_tensor_deprecation():
    with deprecations_are_errors(), pytest.raises(UserWarning, match="deprecated"):
        torch.quantize_per_tensor(torch.randn(3), 0.1, 0, getattr(torch, "q" + "int8"))  # the API we left


def test_quantize_export_load_and_fast_inference_use_no_deprecated_api(results_root, tmp_path):
    train.run(compose_cfg("train", ["name=t", *TINY_MODEL, *TINY_TRAIN]))
    calib = compose_cfg("quantize", ["name=t", "bits=9", *QUANT_TINY])
    qat = compose_cfg("quantize", ["name=t", "bits=8", "quant.steps=2", "train.batch_size=2", "train.chunk_len=32",
                                   "train.val_tokens=100", "train.eval_chunk_len=64", "train.threads=1", *QUANT_TINY])
    tokens = np.random.default_rng(0).integers(0, 100, 200)
    with deprecations_are_errors():
        quantize.run(calib)  # calibration: prepare, calibrate, packed export, reload check, score
        quantize.run(qat)  # QAT through the Trainer
        for name in ("quantize_t_step6_cache0_bits9", "quantize_t_step6_cache0_bits8"):
            rd = RunDir(name)
            model, _ = load_model(rd, None)
            packed = load_export(rd.packed_path)
            assert same_weights(model, packed)
            fast = build_fast_model(rd.packed_path)
            nll, n = evaluate_stream(fast, tokens, 64)
            assert n == 199 and np.isfinite(nll)
            evaluate_stream(build_fast_model(model), tokens, 64)
            exported = load_exported(export_model(rd, None, tmp_path / name))
            assert same_weights(model, exported)


def test_the_package_source_names_no_deprecated_quantization_api():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan reads the package (wherever its modules move)
    pattern = re.compile("|".join(rf"(?<!fake_){re.escape(f)}" for f in FORBIDDEN))  # aten fake_quantize_* ops are fine
    found = [f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "deprecated torch quantization API:\n" + "\n".join(found)
    assert pattern.search("x = torch.quantize_per_channel(w, s, z, 0, dtype)")  # the scan can fail
    assert not pattern.search("q = torch.fake_quantize_per_tensor_affine(x, s, z, -L, L)")
