"""micronet.quantize.ActQuant: the same numerics as the torch.ao FakeQuantize + MovingAverageMinMaxObserver
pair it replaced (figures computed with that code, commit 640791f, and stored here), and old checkpoints load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from micronet.model.evaluation import evaluate_stream
from micronet.compress.quantize import ActQuant, act_quantizers
from test_export import quantized_tiny

# Per (bits, ema): three training-mode calls on inputs(0..2), each with (scale, EMA min, EMA max) after
# it as fp32 hex, the output codes (output / scale) and the positions whose gradient is 0 (clipped);
# then an eval-mode call on inputs(7) * 3 (clipped at +-L, scale unchanged).
FIGURES = {
        '4_0.9': [
            {"scale": "0x1.541e6a0000000p-2", "min": "-0x1.299a9c0000000p+1", "max": "0x1.5dd08c0000000p+0", "codes": [0, 0, 2, 0, -2, 1, 4, 3, -2, -4, -2, 0, -7, -1, -4, -2, -2, -1, 1, 3, 0, 4, -2, 1], "grad_zero": []},
            {"scale": "0x1.53d8520000000p-2", "min": "-0x1.295d480000000p+1", "max": "0x1.84c4ec0000000p+0", "codes": [3, 6, 3, -7, 6, 4, -2, 4, 3, 3, 1, 4, -4, 0, -2, 5, 1, -1, -4, -1, 1, -1, 7, 7], "grad_zero": [22]},
            {"scale": "0x1.943a9a0000000p-2", "min": "-0x1.61b3460000000p+1", "max": "0x1.f778480000000p+0", "codes": [3, -2, -2, -7, 7, 7, -1, 7, 4, -3, 7, -1, -1, -5, 5, 1, 6, -3, 2, -5, 7, 3, 4, 5], "grad_zero": [3, 4, 5, 10, 20]},
            {"eval_codes": [7, 7, -1, -7, -7, -7, 7, 7, -7, -7, 7, 7, 7, -7, 7, 7, -7, -7, -7, -7, -7, 2, -7, 7], "scale_after_eval": "0x1.943a9a0000000p-2"},
        ],
        '8_0.999': [
            {"scale": "0x1.2bf2820000000p-6", "min": "-0x1.299a9c0000000p+1", "max": "0x1.5dd08c0000000p+0", "codes": [7, -7, 35, 6, -29, 20, 71, 52, -38, -69, -34, 2, -127, -12, -68, -40, -30, -17, 22, 57, -7, 75, -36, 19], "grad_zero": []},
            {"scale": "0x1.2bf1e20000000p-6", "min": "-0x1.2999fe0000000p+1", "max": "0x1.5e34460000000p+0", "codes": [54, 106, 52, -126, 115, 65, -42, 80, 56, 49, 19, 76, -64, -1, -36, 82, 21, -16, -69, -12, 17, -14, 127, 126], "grad_zero": [22]},
            {"scale": "0x1.2c832c0000000p-6", "min": "-0x1.2a2a260000000p+1", "max": "0x1.5f63c80000000p+0", "codes": [64, -53, -35, -127, 127, 127, -21, 127, 79, -58, 127, -18, -21, -97, 107, 16, 122, -67, 53, -113, 127, 63, 87, 100], "grad_zero": [3, 4, 5, 7, 10, 20]},
            {"eval_codes": [127, 127, -15, -127, -127, -127, 127, 127, -127, -127, 127, 127, 127, -127, 127, 127, -127, -127, -127, -127, -127, 36, -127, 127], "scale_after_eval": "0x1.2c832c0000000p-6"},
        ],
        '9_0.5': [
            {"scale": "0x1.2ac5620000000p-7", "min": "-0x1.299a9c0000000p+1", "max": "0x1.5dd08c0000000p+0", "codes": [14, -14, 70, 12, -59, 40, 143, 104, -77, -139, -68, 5, -255, -24, -137, -80, -60, -35, 45, 114, -14, 150, -73, 39], "grad_zero": []},
            {"scale": "0x1.2991880000000p-7", "min": "-0x1.2867f60000000p+1", "max": "0x1.104b380000000p+1", "codes": [109, 214, 106, -254, 232, 131, -85, 161, 113, 98, 39, 153, -129, -3, -73, 165, 42, -31, -139, -24, 35, -28, 255, 255], "grad_zero": [22]},
            {"scale": "0x1.226ab60000000p-6", "min": "-0x1.21484c0000000p+2", "max": "0x1.040b9c0000000p+2", "codes": [66, -55, -36, -255, 255, 227, -21, 165, 81, -60, 199, -19, -22, -100, 111, 17, 126, -69, 55, -117, 176, 66, 90, 103], "grad_zero": [3, 4]},
            {"eval_codes": [255, 255, -16, -255, -255, -255, 255, 255, -255, -255, 255, 255, 255, -255, 255, 255, -255, -255, -255, -255, -255, 37, -255, 255], "scale_after_eval": "0x1.226ab60000000p-6"},
        ],
}


def inputs(k: int) -> torch.Tensor:
    rng = np.random.default_rng(k)
    return torch.from_numpy((rng.standard_normal(24) * (1 + k) + 0.3 * k).astype(np.float32))


@pytest.mark.parametrize("key", sorted(FIGURES))
def test_act_quant_reproduces_the_torch_ao_figures(key):
    bits, ema = key.split("_")
    q = ActQuant(int(bits), float(ema))
    *steps, last = FIGURES[key]
    for k, want in enumerate(steps):
        q.train()
        x = inputs(k).requires_grad_(True)
        y = q(x)
        (y * torch.arange(1.0, 25.0)).sum().backward()
        scale = float.fromhex(want["scale"])
        assert float(q.scale) == scale and q.scale.shape == (1,) and int(q.zero_point) == 0
        assert (float(q.min_val), float(q.max_val)) == (float.fromhex(want["min"]), float.fromhex(want["max"]))
        assert torch.equal(y.detach(), torch.tensor(want["codes"], dtype=torch.float32) * scale)
        assert (x.grad == 0).nonzero().flatten().tolist() == want["grad_zero"]
    q.eval()
    y = q(inputs(7) * 3)
    scale = float.fromhex(last["scale_after_eval"])
    assert float(q.scale) == scale and torch.equal(y, torch.tensor(last["eval_codes"], dtype=torch.float32) * scale)


def test_an_unobserved_quantizer_has_scale_1_and_an_empty_batch_changes_nothing():
    q = ActQuant(8).eval()
    assert torch.equal(q(torch.tensor([0.4, 1.6, -200.0])), torch.tensor([0.0, 2.0, -127.0]))
    q.train()
    q(torch.zeros(0))
    assert float(q.scale) == 1.0 and float(q.min_val) == float("inf")


def test_a_calibrated_tiny_model_gives_the_stored_loss_and_scales():
    model, _, _ = quantized_tiny(9)  # calibrated with the torch.ao quantizers: these figures
    tokens = np.random.default_rng(1).integers(0, 60, 300)
    with parametrize.cached():
        nll, n = evaluate_stream(model, tokens, 64)
    scales = [float(q.scale) for _, q in act_quantizers(model)]
    assert n == 299 and nll == pytest.approx(1544.4999310970306, rel=1e-6)
    assert scales[0] == pytest.approx(float.fromhex("0x1.6d31300000000p-7"), rel=1e-6)
    assert sum(scales) == pytest.approx(0.07375041564228013, rel=1e-6)


def test_a_checkpoint_written_with_the_torch_ao_quantizer_loads():
    old = {"fq.fake_quant_enabled": torch.tensor([1], dtype=torch.uint8),
           "fq.observer_enabled": torch.tensor([0], dtype=torch.uint8), "fq.scale": torch.tensor([0.25]),
           "fq.zero_point": torch.tensor([0], dtype=torch.int32),
           "fq.activation_post_process.eps": torch.tensor([torch.finfo(torch.float32).eps]),
           "fq.activation_post_process.min_val": torch.tensor(-31.0),
           "fq.activation_post_process.max_val": torch.tensor(20.0)}
    q = ActQuant(8)
    q.load_state_dict(old)  # strict: every old key mapped or dropped, every new one filled
    assert (float(q.scale), float(q.min_val), float(q.max_val)) == (0.25, -31.0, 20.0)
    assert set(q.state_dict()) == {"scale", "zero_point", "min_val", "max_val"}
