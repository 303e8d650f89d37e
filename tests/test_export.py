"""packed.safetensors: bit packing, the export round trip (same weights, same evaluation loss), the
legacy model.mnq reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.nn.utils import parametrize

from micronet.runs.config import MicronetError
from micronet.model.evaluation import evaluate_stream
from micronet.compress.checkpoint import load_export
from micronet.compress.export import (FORMAT, effective, export_packed, load_packed, pack_codes, plain_names,
                                      same_weights, unpack_codes)
from micronet.compress.mnq import convert_mnq
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.paths import PROJECT_ROOT
from micronet.compress.prune import magnitude_mask
from micronet.compress.quantize import act_quantizers, calibrate, levels, prepare, quantized_weights

# A model.mnq written by the exporter before safetensors (committed with its run's results).
LEGACY_RUN = PROJECT_ROOT / "results" / "quantize_prune0.358_wt2_8.3M_step300_cache2000_bits9"


@pytest.mark.parametrize("bits", [2, 3, 8, 9, 16, 32])
def test_codes_pack_to_bits_each_and_unpack_exactly(bits):
    L = levels(bits)
    codes = np.random.default_rng(bits).integers(-L, L + 1, 1001)
    codes[:2] = [-L, L]
    buf = pack_codes(codes, bits)
    assert len(buf) == -(-1001 * bits // 8)
    assert np.array_equal(unpack_codes(buf, bits, 1001), codes)


def quantized_tiny(bits: int) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=60, d_model=16, n_layer=2, n_head=2, d_head=8, d_ff=32, n_seq=8,
                                      segment_len=8, cutoffs=[20, 40], bin_dims=[16, 8, 4]))
    with torch.no_grad():
        for p in model.parameters():  # nonzero biases and LayerNorms: every tensor kind is exercised
            p.add_(torch.randn_like(p) * 0.05)
    masks = {n: magnitude_mask(dict(model.named_parameters())[n], 0.6)
             for n in ("layers.0.ffn.0.weight", "embed.tables.0.weight", "softmax.biases.1")}
    info = prepare(model, bits, bits, masks=masks)
    calibrate(model, np.random.default_rng(0).integers(0, 60, 400), batches=2, batch_size=2, chunk_len=24)
    return model, info, masks


@pytest.mark.parametrize("bits", [4, 9])
def test_packed_round_trip_gives_the_same_weights_and_loss(tmp_path, bits):
    model, info, masks = quantized_tiny(bits)
    path = tmp_path / "packed.safetensors"
    lineage = {"stage": "quantize", "parent": "p", "parent_step": 3, "parent_lineage": None}
    size = export_packed(model, path, info, lineage)
    assert size == path.stat().st_size
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temp file left
    loaded = load_packed(path)
    assert same_weights(model, loaded)
    assert plain_names(loaded) == plain_names(model)
    for name, keep in masks.items():
        assert not effective(loaded, name)[~keep].any()
    tokens = np.random.default_rng(1).integers(0, 60, 300)
    with parametrize.cached():
        a = evaluate_stream(model, tokens, 64)
    b = evaluate_stream(loaded, tokens, 64)
    assert a == b  # bit-identical weights and activation scales: the same loss exactly
    with safe_open(str(path), framework="np") as f:  # any safetensors reader: settings and lineage in metadata
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        keys = set(f.keys())
    assert meta["format"] == FORMAT and meta["bits"] == bits and meta["lineage"] == lineage
    assert meta["quant"]["masked"] == sorted(masks) and meta["model_config"]["d_model"] == 16
    assert {"layers.0.ffn.0.weight.codes", "layers.0.ffn.0.weight.mask", "layers.0.ffn.0.weight.scales",
            "layers.0.ln1.weight", "activations"} <= keys


def test_packed_payload_is_the_packed_bits_plus_fp32_extras(tmp_path):
    bits = 8
    model, info, _ = quantized_tiny(bits)
    path = tmp_path / "m.safetensors"
    export_packed(model, path, info)
    with safe_open(str(path), framework="np") as f:
        payload = sum(f.get_tensor(k).nbytes for k in f.keys())
    qnames = quantized_weights(model)
    dense = sum(-(-effective(model, n).numel() * bits // 8) + 4 * (effective(model, n).shape[0] if pc else 1)
                for n, pc in qnames.items())
    raw = sum(4 * effective(model, n).numel() for n in plain_names(model) if n not in qnames)
    nonzero_bits = sum(int((effective(model, n) != 0).sum()) * bits // 8 for n in qnames)
    assert nonzero_bits + raw < payload <= dense + raw + 12 * info["n_act_quantizers"]


@pytest.mark.skipif(not (LEGACY_RUN / "model.mnq").exists(), reason="the committed legacy model.mnq is not here")
def test_a_legacy_mnq_file_still_loads_and_equals_its_repacked_safetensors(tmp_path):
    path = LEGACY_RUN / "model.mnq"
    old = load_export(path)  # by content: the MNQ1 magic
    assert old.cfg.n_layer == 8 and len(act_quantizers(old)) == 7 * 8 + 1
    assert all(float(q.scale) != 1.0 for _, q in act_quantizers(old))  # calibrated ranges came back
    size = convert_mnq(path, tmp_path / "packed.safetensors")  # verified by reloading inside
    new = load_export(tmp_path / "packed.safetensors")
    assert same_weights(old, new) and size == (tmp_path / "packed.safetensors").stat().st_size
    assert size < path.stat().st_size * 1.01  # the same packed bits: no bigger than the private format, to 1%
    for name in ("layers.0.ffn.0.weight", "embed.tables.0.weight"):  # pruned zeros kept
        assert torch.equal(effective(new, name) == 0, effective(old, name) == 0)


def test_bad_export_files_are_one_line_errors(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"nope, not a safetensors file")
    with pytest.raises(MicronetError, match="not a readable safetensors file"):
        load_export(tmp_path / "x.safetensors")
    with pytest.raises(MicronetError, match="no exported model"):
        load_export(tmp_path / "missing.safetensors")
