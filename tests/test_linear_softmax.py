"""The blocked linear-softmax target log-prob equals log_softmax + gather, in values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from micronet.model.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax, init_adaptive
from micronet.model.linear_softmax import NARROW_DIM, target_log_prob


@pytest.mark.parametrize("block_elems", [1, 7 * 13, 1 << 21])  # one row per block, ragged blocks, one block
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("keep_probs", [True, False])
@pytest.mark.parametrize("d", [5, 20])  # the transposed (narrow) and the plain backward matmuls
def test_matches_log_softmax_gather(block_elems, with_bias, keep_probs, d):
    assert (d < NARROW_DIM) == (d == 5)
    g = torch.Generator().manual_seed(0)
    N, V = 23, 13
    x = torch.randn(N, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    t = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, dtype=torch.float64, generator=g)  # an arbitrary upstream gradient

    got = target_log_prob(x, w, b, t, block_elems=block_elems, keep_probs=keep_probs)
    grads = torch.autograd.grad((got * up).sum(), [x, w] + ([b] if with_bias else []))
    logits = x @ w.T + (b if with_bias else 0)
    ref = F.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)
    ref_grads = torch.autograd.grad((ref * up).sum(), [x, w] + ([b] if with_bias else []))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


def test_second_backward_through_consumed_probabilities_raises():
    """The backward turns the kept probabilities into the gradient in place: a retained graph must not
    silently give a wrong second gradient (autograd's version check); keep_probs=False allows it."""
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(6, 3)
    t = torch.tensor([0, 5, 2, 2])
    out = target_log_prob(x, w, None, t).sum()
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, x)
    out = target_log_prob(x, w, None, t, keep_probs=False).sum()
    grads = [torch.autograd.grad(out, x, retain_graph=True)[0] for _ in range(2)]
    torch.testing.assert_close(grads[0], g1)
    torch.testing.assert_close(grads[1], g1)


def test_fp32_inputs_and_empty_rows():
    x, w = torch.randn(4, 3), torch.randn(6, 3)
    out = target_log_prob(x, w, torch.zeros(6), torch.tensor([0, 5, 2, 2]))
    assert out.dtype == torch.float32 and (out < 0).all()
    assert target_log_prob(x[:0], w, None, torch.zeros(0, dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize("bin_dims", [[8, 4, 2], [6, 4, 2]])  # identity head / projected head
def test_adaptive_target_log_probs_equal_full_distribution(bin_dims):
    """Values and gradients of every parameter agree with the full log-probabilities' gather."""
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(40, 8, [10, 25], bin_dims).double()
    sm = AdaptiveLogSoftmax(emb).double()
    init_adaptive(emb, sm, std=0.5)
    h = torch.randn(31, 8, dtype=torch.float64, requires_grad=True)
    t = torch.cat([torch.tensor([0, 9, 10, 24, 25, 39]), torch.randint(0, 40, (25,))])
    params = [h, *emb.parameters(), *sm.parameters()]

    got = sm.target_log_probs(h, t)
    ref = sm.log_probs(h).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    g_got = torch.autograd.grad(got.sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for a, r in zip(g_got, g_ref):
        if r is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
