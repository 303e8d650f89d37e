"""N-bit quantization: scales, codes, activation quantizers, the quantize stage (calibration and QAT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg
from micronet import quantize, train
from micronet.compress.checkpoint import load_model
from micronet.compress.export import effective, weight_scale
from micronet.compress.prune import magnitude_mask, prunable_names
from micronet.compress.quantize import act_quantizers, calibrate, levels, prepare, quantized_weights, reduced_scale
from micronet.model.cache import read_cache_params, write_cache_params
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.config import ConfigError, MicronetError
from micronet.runs.results import CheckpointError, RunDir

QUANT_TINY = ["quant.calib_batches=2", "quant.calib_chunk_len=32", "eval_splits=[]"]



def tiny_model(n_layer: int = 2) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(vocab_size=60, d_model=16, n_layer=n_layer, n_head=2, d_head=8, d_ff=32,
                                     n_seq=8, segment_len=8, cutoffs=[20, 40], bin_dims=[16, 8, 4]))


@pytest.mark.parametrize("bits", [2, 4, 8, 9, 12, 16, 24, 32])
def test_scales_keep_32_minus_b_leading_bits_and_never_clip(bits):
    amax = torch.rand(500) * 10 + 1e-3
    s = reduced_scale(amax, bits)
    low = (1 << min(bits, 23)) - 1
    assert not (s.view(torch.int32) & low).any()
    assert (s * levels(bits) >= amax).all()  # rounded up: the largest weight is not clipped
    assert (s <= amax / levels(bits) * (1 + 2.0 ** (min(bits, 23) - 23) * 2)).all()


@pytest.mark.parametrize("bits", [3, 8, 9])
def test_codes_in_range_exact_and_pruned_zeros_kept(bits):
    model = tiny_model()
    masks = {n: magnitude_mask(dict(model.named_parameters())[n], 0.5) for n in prunable_names(model.cfg)[:6]}
    prepare(model, bits, bits, masks=masks)
    L = levels(bits)
    for name, per_channel in quantized_weights(model).items():
        w = effective(model, name)
        s = weight_scale(model, name)
        sb = s.view(-1, *[1] * (w.dim() - 1)) if per_channel else s
        codes = w / sb
        assert torch.equal(codes, codes.round()) and codes.abs().max() <= L, name
        assert torch.equal(codes * sb, w), name  # code x scale is exact in fp32
        assert not w.any() or codes.abs().max() >= L - 1, name  # the range is used (zero-init biases: all 0)
        if name in masks:
            assert not w[~masks[name]].any(), name
    assert not any(".pos" in n or ".ln" in n for n in quantized_weights(model))  # left in fp32


def test_explicit_attention_path_matches_the_fused_one():
    model = tiny_model().eval()
    x = torch.randint(0, 60, (2, 20))
    with torch.no_grad():
        ref, _ = model(x)
        for layer in model.layers:
            layer.attn.act_probs = nn.Identity()
        out, _ = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_activation_quantizers_observe_only_in_training_mode():
    model = tiny_model(n_layer=3)
    info = prepare(model, 8, 8)
    assert info["n_act_quantizers"] == len(act_quantizers(model)) == 7 * 3 + 1
    data = np.random.default_rng(0).integers(0, 60, 500)
    calibrate(model, data, batches=2, batch_size=2, chunk_len=16)
    scales = [q.scale.clone() for _, q in act_quantizers(model)]
    assert all(s.item() != 1.0 for s in scales)  # calibrated
    with torch.no_grad():
        model.eval()(torch.randint(0, 60, (1, 30)) * 0 + 7)
    assert all(torch.equal(a, q.scale) for a, (_, q) in zip(scales, act_quantizers(model)))
    assert prepare(tiny_model(), 8, 32)["n_act_quantizers"] == 0  # 32-bit activations: none


@pytest.fixture
def parent(results_root):
    train.run(compose_cfg("train", ["name=t", *TINY_MODEL, *TINY_TRAIN]))
    return RunDir("t")


def test_quantize_stage_writes_a_scored_run_that_loads_everywhere(parent):
    ckpt = parent.load()
    ckpt["model"]["layers.0.ffn.0.weight"][:, ::2] = 0  # a pruned parent: half of fc1's weights
    parent.save(6, {k: v for k, v in ckpt.items() if k not in ("step", "format")})
    out = quantize.run(compose_cfg("quantize", ["name=t", "bits=9", *QUANT_TINY]))
    rd = RunDir("quantize_t_step6_cache0_bits9")
    assert out["name"] == rd.name and rd.steps() == [1]
    for path in (rd.score_path(1), rd.quantize_path(1), rd.packed_path, rd.config_path):
        assert path.exists(), path
    q = json.loads(rd.quantize_path(1).read_text())
    assert q["export_bytes"] == rd.packed_path.stat().st_size and q["counted_bytes"]["paper"] > 0
    ck = rd.load()
    assert {k: ck["quant"][k] for k in ("bits", "act_bits", "n_act_quantizers")} == \
        {"bits": 9, "act_bits": 9, "n_act_quantizers": 8}
    model, _ = load_model(rd, None)  # rebuilt with its quantizers
    eff = effective(model, "layers.0.ffn.0.weight")
    assert not eff[:, ::2].any() and (eff[:, 1::2] != 0).float().mean() > 0.9  # few round to 0 at 9 bits
    settings = json.loads(rd.score_path(1).read_text())["settings"]
    assert (settings["bits"], settings["act_bits"], settings["n_act_quantizers"]) == (9, 9, 8)


def test_qat_fine_tunes_through_the_trainer_and_keeps_masks(parent):
    ckpt = parent.load()
    ckpt["model"]["layers.0.attn.qkv.weight"][:4] = 0
    parent.save(6, {k: v for k, v in ckpt.items() if k not in ("step", "format")})
    quantize.run(compose_cfg("quantize", ["name=t", "bits=8", "quant.steps=2", "train.batch_size=2",
                                          "train.chunk_len=32", "train.val_tokens=100", "train.eval_chunk_len=64",
                                          "train.threads=1", "optim.lr=1e-2", *QUANT_TINY]))
    rd = RunDir("quantize_t_step6_cache0_bits8")
    assert rd.steps()[-1] == 2
    model, ck = load_model(rd, None)
    assert ck["quant"]["steps"] == 2
    w = effective(model, "layers.0.attn.qkv.weight")
    assert not w[:4].any() and w[4:].abs().sum() > 0
    assert not torch.equal(w[4:], ckpt["model"]["layers.0.attn.qkv.weight"][4:])  # it did train


def test_the_parents_searched_cache_carries_into_the_quantized_run(parent):
    write_cache_params(parent.cache_params_path(6, 50), 50, 0.2, 0.03)
    out = quantize.run(compose_cfg("quantize", ["name=t", "bits=10", *QUANT_TINY]))  # n_cache: the searched one
    rd = RunDir("quantize_t_step6_cache50_bits10")
    assert out["name"] == rd.name and out["n_cache"] == 50
    assert read_cache_params(rd.cache_params_path(1, 50)) == (0.2, 0.03)
    assert json.loads(rd.score_path(1).read_text())["settings"]["n_cache"] == 50


@pytest.mark.parametrize("override", ["bits=1", "bits=33", "act_bits=40"])
def test_bits_outside_2_to_32_are_refused(parent, override):
    with pytest.raises(ConfigError, match="must be an integer in 2..32"):
        quantize.run(compose_cfg("quantize", ["name=t", override]))


def test_runs_without_checkpoint_or_missing_are_refused(results_root):
    (results_root / "empty").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        quantize.run(compose_cfg("quantize", ["name=empty"]))
    with pytest.raises(MicronetError, match="no results directory"):
        quantize.run(compose_cfg("quantize", ["name=nope"]))
