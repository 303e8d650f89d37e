"""Hash dropout: the rate, the scale, the same mask in backward, seeding, and the integer arithmetic."""

import numpy as np
import pytest
import torch

from micronet.model.dropout import Dropout, dropout, hash32, keep_scale


def murmur_reference(n: int, mult: int, add: int) -> np.ndarray:
    """The same hash in numpy uint32, where wrap-around and logical shifts are defined behaviour."""
    with np.errstate(over="ignore"):
        h = (np.arange(n, dtype=np.uint64) * np.uint64(mult) + np.uint64(add)).astype(np.uint32)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
    return h


@pytest.mark.parametrize("shape", [(37, 101), (5, 3, 17), (1000,)])
@pytest.mark.parametrize("keys", [(1, 0), (2654435761, 7), (0xFFFFFFFF, 0xFFFFFFFF), (12345, 2**31 + 5)])
def test_int32_hash_equals_the_uint32_reference(shape, keys):
    """torch int32 ops wrap like uint32 (vector bodies and scalar tails alike: odd sizes)."""
    got = hash32(shape, *keys).numpy().view(np.uint32).reshape(-1)
    assert np.array_equal(got, murmur_reference(int(np.prod(shape)), *keys))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_drop_rate_and_scale(p):
    m = keep_scale((512, 1000), p, 2654435761, 99)
    rate = (m == 0).double().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / m.numel()) ** 0.5  # 5 sigma
    assert torch.equal(m[m != 0].unique(), torch.tensor([1 / (1 - p)], dtype=torch.float32))
    # The documented rule: dropped where the hash, read as int32, is below -2^31 + p * 2^32.
    h = murmur_reference(m.numel(), 2654435761, 99).view(np.int32).astype(np.int64)
    assert np.array_equal((m == 0).numpy().reshape(-1), h < -(2**31) + 2 * round(p * 2**31))


def test_masks_look_independent():
    """Neighbours (along rows and columns) are dropped together at rate p^2, not more."""
    p = 0.2
    drop = keep_scale((1000, 1000), p, *torch.randint(0, 2**31, (2,)).tolist()) == 0
    for a, b in [(drop[:, 1:], drop[:, :-1]), (drop[1:], drop[:-1])]:
        both = (a & b).double().mean().item()
        assert abs(both - p * p) < 5 * (p * p / a.numel()) ** 0.5


@pytest.mark.parametrize("keep_mask_max", [1 << 23, 0])  # mask kept for the backward / recomputed from the keys
def test_backward_uses_the_forward_mask_and_seeding_reproduces(monkeypatch, keep_mask_max):
    monkeypatch.setattr("micronet.model.dropout.KEEP_MASK_MAX_ELEMS", keep_mask_max)
    x = torch.randn(64, 333, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.25)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert torch.allclose(x.grad, g * kept / 0.75)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.25), y)  # keys come from torch's generator
    assert not torch.equal(dropout(x, 0.25), y)  # and the next call draws new ones


def test_module_modes_and_bad_rate():
    d = Dropout(0.5)
    x = torch.ones(100, 100)
    assert not torch.equal(d(x), x)
    assert torch.equal(d.eval()(x), x)
    assert torch.equal(dropout(x, 0.0), x)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.0)
