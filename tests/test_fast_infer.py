"""The fast CPU inference model (micronet.compress.fast_infer): close to the fake-quantized export, same API,
evaluation with memory and cache, and ``python -m micronet.evaluate ... fast=true``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import compose_cfg, run_cli
from micronet import evaluate, quantize, train
from micronet.compress import fast_infer
from micronet.model.cache import EvalCache
from micronet.runs.config import ConfigError, MicronetError
from micronet.model.evaluation import evaluate_stream
from micronet.compress.checkpoint import load_export
from micronet.compress.export import export_packed, load_packed
from micronet.compress.fast_infer import FastAdaptiveLogSoftmax, Int8Linear, build_fast_model
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.compress.prune import magnitude_mask
from micronet.compress.quantize import act_quantizers, calibrate, prepare
from micronet.runs.results import RunDir
from test_export import LEGACY_RUN
from test_soft_labels import tiny_train, write_tiny_corpus

# Tolerances of the int8 model against the fake-quantized one, per token log p(target) on a model whose
# log-probs spread over ~2 nats (std): measured mean |diff| 0.021 nats and mean NLL +0.067% at 9 bits
# (+0.086% with the eval cache); a 4-bit export of the same weights is off by 0.24 nats and +1.75% NLL
# (the checks below prove both tolerances would fail). On the 9-bit WikiText-2 model: -0.02% (test below).
MEAN_ABS_TOL = 0.04  # nats
NLL_REL_TOL = 0.001


def sharp_export(path, bits: int = 9):
    """A tiny pruned, quantized, calibrated model (weights large enough for peaked predictions), exported."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=60, d_model=16, n_layer=2, n_head=2, d_head=8, d_ff=32, n_seq=8,
                                      segment_len=8, cutoffs=[20, 40], bin_dims=[16, 8, 4]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    params = dict(model.named_parameters())
    masks = {n: magnitude_mask(params[n], 0.4) for n in ("layers.0.ffn.0.weight", "embed.tables.0.weight",
                                                          "layers.1.attn.qkv.weight")}
    info = prepare(model, bits, bits, masks=masks)
    calibrate(model, np.random.default_rng(0).integers(0, 60, 400), batches=2, batch_size=2, chunk_len=24)
    export_packed(model, path, info)
    return path


def target_lp(model: TransformerLM, tokens: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(tokens[:-1])[None]
    with torch.no_grad():
        h, _ = model(x)
        return model.target_log_probs(h, torch.from_numpy(tokens[1:])[None])[0]


TOKENS = np.random.default_rng(1).integers(0, 60, 301)


@pytest.fixture
def tiny_env(tmp_path, results_root, monkeypatch):
    """Results and data caches under tmp (inherited by the CLI subprocesses); the synthetic corpus folder."""
    monkeypatch.setenv("MICRONET_DATA", str(tmp_path / "data"))
    return write_tiny_corpus(tmp_path / "raw")


def test_int8_model_is_close_to_the_fake_quantized_one_and_the_tolerance_can_fail(tmp_path):
    path = sharp_export(tmp_path / "m.safetensors")
    ref = target_lp(load_packed(path), TOKENS)
    assert ref.std() > 1.0  # peaked predictions: a near-uniform model would agree with anything
    fast = build_fast_model(path)  # int8 by default
    assert fast.fast["backend"] == "int8" and fast.fast["int8_linears"] == 8  # qkv, out, fc1(+ReLU), fc2 x 2 layers
    assert isinstance(fast.softmax, FastAdaptiveLogSoftmax) and isinstance(fast.softmax.head, Int8Linear)
    lp = target_lp(fast, TOKENS)
    assert (lp - ref).abs().mean() < MEAN_ABS_TOL
    assert abs(lp.mean() / ref.mean() - 1) < NLL_REL_TOL
    coarse = target_lp(build_fast_model(sharp_export(tmp_path / "m4.safetensors", bits=4)), TOKENS)
    assert (coarse - ref).abs().mean() > MEAN_ABS_TOL  # the same weights at 4 bits: rejected
    assert abs(coarse.mean() / ref.mean() - 1) > NLL_REL_TOL
    full = fast.log_probs(torch.randn(5, 16))  # the full distribution is normalised
    assert torch.allclose(full.logsumexp(-1), torch.zeros(5), atol=1e-5)


def test_fp32_backend_segments_and_row_blocks_change_nothing_but_the_fake_quantization(tmp_path, monkeypatch):
    path = sharp_export(tmp_path / "m.safetensors")
    fq = load_packed(path)
    a = target_lp(build_fast_model(path, backend="fp32", segment_len=None), TOKENS)
    monkeypatch.setattr(fast_infer, "HEAD_ROWS", 64)  # the softmax in row blocks of 64 (and a last one of 44)
    b = target_lp(build_fast_model(fq, backend="fp32", segment_len=3), TOKENS)  # from the model, not the file
    assert torch.allclose(a, b, atol=1e-5)
    for _, q in act_quantizers(fq):  # fake quantizers as identities: the same model
        q.forward = lambda x: x
    assert torch.allclose(a, target_lp(fq, TOKENS), atol=1e-4)


def test_evaluate_stream_carries_memory_and_the_eval_cache(tmp_path):
    path = sharp_export(tmp_path / "m.safetensors")
    fq, fast32, fast8 = load_packed(path), build_fast_model(path, "fp32"), build_fast_model(path)
    whole = evaluate_stream(fast32, TOKENS, 300)
    assert evaluate_stream(fast32, TOKENS, 7) == pytest.approx(whole, rel=1e-5)  # chunks of 7, memory of 8
    for chunk in (7, 300):  # int8: activation ranges are per call, so chunking shifts the loss a little
        nll, n = evaluate_stream(fast8, TOKENS, chunk)
        assert n == 300 and nll == pytest.approx(whole[0], rel=NLL_REL_TOL)
    ref_c = evaluate_stream(fq, TOKENS, 50, cache=EvalCache(40, 0.3, 0.05))
    fast_c = evaluate_stream(fast8, TOKENS, 50, cache=EvalCache(40, 0.3, 0.05))
    assert fast_c[0] == pytest.approx(ref_c[0], rel=NLL_REL_TOL) and fast_c[0] != pytest.approx(whole[0], rel=1e-3)


def test_int8_linear_is_the_product_of_its_codes_and_scales():
    torch.manual_seed(0)
    w, b, x = torch.randn(37, 20), torch.randn(37), torch.randn(3, 5, 20)
    w[4] = 0  # an all-zero output channel, and an all-zero input row
    x[1, 2] = 0
    lin = Int8Linear(w, b, relu=True)
    assert lin.codes_t.dtype == torch.int8 and lin.codes_t.abs().max() == 127 and lin.scale.shape == (37,)
    qx, sx = fast_infer.int8_codes(x.reshape(-1, 20))
    exact = torch.relu((qx.double() * sx.double()) @ (lin.codes_t.double() * lin.scale.double()) + b.double())
    out = lin(x)
    assert out.shape == (3, 5, 37) and not out[1, 2].sub(torch.relu(b)).any() and not out[..., 4].sub(torch.relu(b[4])).any()
    torch.testing.assert_close(out.reshape(-1, 37).double(), exact, rtol=1e-6, atol=1e-5)
    assert (out - torch.relu(x @ w.T + b)).abs().max() < 0.05 * (x @ w.T).abs().max()  # close to fp32


@pytest.mark.skipif(not (LEGACY_RUN / "model.mnq").exists(), reason="the committed 9-bit model.mnq is not here")
def test_on_the_9_bit_wikitext2_model_int8_is_within_0_1_percent_of_fake_quantization():
    from micronet.data.corpus import DataConfig, load_corpus

    torch.set_num_threads(1)
    tokens = load_corpus(DataConfig()).valid[:4033]
    ref = evaluate_stream(load_export(LEGACY_RUN / "model.mnq"), tokens, 4032)  # the fake-quantized model
    nll, n = evaluate_stream(build_fast_model(LEGACY_RUN / "model.mnq"), tokens, 4032)
    assert n == 4032 and abs(nll / ref[0] - 1) < NLL_REL_TOL


def test_bad_arguments_are_clear_errors(tmp_path):
    (tmp_path / "x.mnq").write_bytes(b"nope")
    with pytest.raises(MicronetError, match="not a readable safetensors file"):
        build_fast_model(tmp_path / "x.mnq")
    with pytest.raises(ConfigError, match="fast backend must be one of"):
        build_fast_model(sharp_export(tmp_path / "m.safetensors"), backend="int4")


def test_evaluate_fast_true_writes_its_own_file_for_quantized_and_plain_runs(tiny_env):
    train.run(tiny_train("t", tiny_env))
    quantize.run(compose_cfg("quantize", ["name=t", "bits=9", "quant.calib_batches=2", "quant.calib_chunk_len=32",
                                          "eval_splits=[]"]))
    q = RunDir("quantize_t_step4_cache0_bits9")
    exact = evaluate.run(compose_cfg("evaluate", [f"name={q.name}", "splits=[valid]", "n_cache=30"]))
    r = run_cli("micronet.evaluate", f"name={q.name}", "splits=[valid]", "n_cache=30", "fast=true",
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    fast = json.loads((q.path / "eval_step1_n30_fast.json").read_text())
    assert fast["fast"]["backend"] == "int8" and fast["valid"]["cache"] == exact["valid"]["cache"]
    assert fast["valid"]["tokens"] == exact["valid"]["tokens"]
    assert math.isclose(fast["valid"]["ppl"], exact["valid"]["ppl"], rel_tol=NLL_REL_TOL)
    assert json.loads(q.eval_path(1, 30).read_text()) == json.loads(json.dumps(exact))  # the exact file untouched
    plain = evaluate.run(compose_cfg("evaluate", ["name=t", "splits=[valid]", "fast=true"]))  # any run works
    assert RunDir("t").path.joinpath("eval_step4_fast.json").exists() and not RunDir("t").eval_path(4).exists()
    assert plain["fast"]["int8_linears"] == 4 and plain["valid"]["ppl"] > 1


def test_fast_true_on_a_gpu_device_is_one_error_line(tiny_env):
    train.run(tiny_train("t", tiny_env))
    r = run_cli("micronet.evaluate", "name=t", "fast=true", "device=cuda")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "micronet.evaluate: error: fast=true is a CPU inference path (int8 CPU kernels); use device=cpu, not cuda")
