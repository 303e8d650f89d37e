"""model.mnq: bit packing, and the export round trip (same weights, same evaluation loss)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from micronet.compress.export import (effective, export_mnq, load_mnq, pack_codes, plain_names, same_weights,
                                      unpack_codes)
from micronet.compress.prune import magnitude_mask
from micronet.compress.quantize import calibrate, levels, prepare, quantized_weights
from micronet.model.evaluation import evaluate_stream
from micronet.model.transformer import ModelConfig, TransformerLM



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
def test_mnq_round_trip_gives_the_same_weights_and_loss(tmp_path, bits):
    model, info, masks = quantized_tiny(bits)
    path = tmp_path / "model.mnq"
    size = export_mnq(model, path, info)
    assert size == path.stat().st_size
    loaded = load_mnq(path)
    assert same_weights(model, loaded)
    assert plain_names(loaded) == plain_names(model)
    for name, keep in masks.items():
        assert not effective(loaded, name)[~keep].any()
    tokens = np.random.default_rng(1).integers(0, 60, 300)
    with parametrize.cached():
        a = evaluate_stream(model, tokens, 64)
    b = evaluate_stream(loaded, tokens, 64)
    assert a == b  # bit-identical weights and activation scales: the same loss exactly


def test_mnq_payload_is_the_packed_bits_plus_fp32_extras(tmp_path):
    bits = 8
    model, info, _ = quantized_tiny(bits)
    path = tmp_path / "m.mnq"
    size = export_mnq(model, path, info)
    payload = size - 8 - struct.unpack("<I", path.read_bytes()[4:8])[0]
    qnames = quantized_weights(model)
    dense = sum(-(-effective(model, n).numel() * bits // 8) + 4 * (effective(model, n).shape[0] if pc else 1)
                for n, pc in qnames.items())
    raw = sum(4 * effective(model, n).numel() for n in plain_names(model) if n not in qnames)
    nonzero_bits = sum(int((effective(model, n) != 0).sum()) * bits // 8 for n in qnames)
    assert nonzero_bits + raw < payload <= dense + raw + 12 * info["n_act_quantizers"]
