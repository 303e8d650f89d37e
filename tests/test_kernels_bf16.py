"""The kernels changed for bf16 training, in fp32 and under bf16 autocast, against fp64 definitions.

Tolerances, and why: fp32 results must match fp64 to float32 rounding (relative 1e-5). bf16 keeps 8
significant bits (unit roundoff 2**-9 = 0.2%), so a bf16 result is checked against the error that rounding
its inputs and outputs to bf16 must cause: logits of magnitude |z| are off by up to ~|z| * 2**-8, so the
log-probabilities are compared with an absolute bound of 2**-7 * (1 + max |z|) (the mean error, which
training sees, with 2**-9), gradients with a relative Frobenius bound of 2%. A kernel that computed its
normaliser in bf16, dropped a term or used the wrong scale fails these by orders of magnitude.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from micronet.model import linear_softmax
from micronet.model.band_attention import windows
from micronet.model.dropout import _HashDropout, keep_scale
from micronet.model.linear_softmax import NARROW_BLOCKED_MIN_ELEMS, narrow_target_log_prob, target_log_prob
from micronet.model.transformer import ModelConfig, TransformerLM

BF16_GRAD_RTOL = 2e-2


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("keep_probs", [True, False])
@pytest.mark.parametrize("d, V", [(4, 3000), (64, 700), (256, 350)])  # narrow tail, mid tail, head
def test_target_log_prob_matches_fp64(precision, keep_probs, d, V):
    g = torch.Generator().manual_seed(d)
    N = 97
    x = torch.randn(N, d, generator=g) / d**0.25
    w = torch.randn(V, d, generator=g) / d**0.25  # logits ~ N(0, 1)..N(0, 3): a trained model's range
    b = torch.randn(V, generator=g) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    t[:5] = (x[:5] @ w.T + b).argmax(1)  # some targets with p_t near 1: the (1 - p_t) gradient term
    up = torch.randn(N, generator=g)
    ref_in = [a.double().requires_grad_() for a in (x, w, b)]
    logits = ref_in[0] @ ref_in[1].T + ref_in[2]
    ref = F.log_softmax(logits, -1).gather(1, t[:, None]).squeeze(1)
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), ref_in)

    ins = [a.clone().requires_grad_() for a in (x, w, b)]
    with autocast(precision == "bf16"):
        got = target_log_prob(*ins, t, block_elems=4096, keep_probs=keep_probs)
    grads = torch.autograd.grad((got * up).sum(), ins)
    assert got.dtype == torch.float32  # the log-probabilities are fp32 either way
    err = got.detach().double() - ref.detach()
    if precision == "fp32":
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        assert all(rel_err(a, r) < 1e-5 for a, r in zip(grads, ref_grads))
    else:
        bound = 2**-7 * (1 + float(logits.detach().abs().max()))
        assert float(err.abs().max()) <= bound, (float(err.abs().max()), bound)
        assert abs(float(err.mean())) <= 2**-11 * (1 + float(logits.detach().abs().max()))
        errs = [rel_err(a, r) for a, r in zip(grads, ref_grads)]
        assert max(errs) < BF16_GRAD_RTOL, errs
        assert max(errs) > 1e-5  # really ran in bf16 (fp32 would be ~1e-7)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("path", ["keep_probs", "recompute", "narrow"])
def test_k_targets_per_row_match_fp64(precision, path):
    """(N, k) targets (distillation's top-k): k gathers of one softmax, repeated ids' gradients added."""
    g = torch.Generator().manual_seed(3)
    N, k = 41, 5
    d, V = (4, 900) if path == "narrow" else (64, 700)
    x = torch.randn(N, d, generator=g) / d**0.25
    w = torch.randn(V, d, generator=g) / d**0.25
    b = torch.randn(V, generator=g) * 0.5
    t = torch.randint(0, V, (N, k), generator=g)
    t[:4, 0] = (x[:4] @ w.T + b).argmax(1)  # p near 1
    t[4:8, 1] = t[4:8, 3]  # repeated ids in a row
    up = torch.randn(N, k, generator=g)
    ref_in = [a.double().requires_grad_() for a in (x, w, b)]
    logits = ref_in[0] @ ref_in[1].T + ref_in[2]
    ref = F.log_softmax(logits, -1).gather(1, t)
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), ref_in)
    ins = [a.clone().requires_grad_() for a in (x, w, b)]
    with autocast(precision == "bf16"):
        if path == "narrow":
            got = narrow_target_log_prob(*ins, t, block_elems=37 * 41)
        else:
            got = target_log_prob(*ins, t, block_elems=4096, keep_probs=path == "keep_probs")
    assert got.shape == (N, k) and got.dtype == torch.float32
    grads = torch.autograd.grad((got * up).sum(), ins)
    if precision == "fp32" or path == "narrow":  # the narrow path is fp32 under autocast too
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        assert all(rel_err(a, r) < 1e-5 for a, r in zip(grads, ref_grads))
    else:
        err = got.detach().double() - ref.detach()
        assert float(err.abs().max()) <= 2**-7 * (1 + float(logits.detach().abs().max()))
        errs = [rel_err(a, r) for a, r in zip(grads, ref_grads)]
        assert 1e-5 < max(errs) < BF16_GRAD_RTOL, errs


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("block_elems", [1, 37 * 23, 1 << 19])  # one column per block, ragged blocks, one block
def test_column_blocked_narrow_path_is_exact_in_fp64(block_elems, with_bias):
    g = torch.Generator().manual_seed(1)
    N, V, d = 23, 101, 4
    x, w = (torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True) for n in (N, V))
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    t, up = torch.randint(0, V, (N,), generator=g), torch.randn(N, dtype=torch.float64, generator=g)
    params = [x, w] + ([b] if with_bias else [])
    got = narrow_target_log_prob(x, w, b, t, block_elems=block_elems)
    ref = F.log_softmax(x @ w.T + (b if with_bias else 0), -1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for a, r in zip(torch.autograd.grad((got * up).sum(), params), torch.autograd.grad((ref * up).sum(), params)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_wide_narrow_bin_takes_the_column_blocked_path_and_matches_fp64(precision, monkeypatch):
    """A d=4 bin of more than NARROW_BLOCKED_MIN_ELEMS logits (the 8.3M's rare-word tail, scaled down):
    fp32 inside even under bf16 autocast, so fp32 tolerances hold in both precisions."""
    g = torch.Generator().manual_seed(2)
    N, V, d = 70, NARROW_BLOCKED_MIN_ELEMS // 70 + 1000, 4
    x, w = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g) * 0.5
    b, t, up = torch.randn(V, generator=g) * 0.1, torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g)
    calls, real = [], linear_softmax._NarrowTargetLogProb.apply
    monkeypatch.setattr(linear_softmax._NarrowTargetLogProb, "apply", lambda *a: calls.append(1) or real(*a))
    ins = [a.clone().requires_grad_() for a in (x, w, b)]
    with autocast(precision == "bf16"):
        got = target_log_prob(*ins, t)
    grads = torch.autograd.grad((got * up).sum(), ins)
    assert calls and got.dtype == torch.float32
    ref_in = [a.double().requires_grad_() for a in (x, w, b)]
    ref = F.log_softmax(ref_in[0] @ ref_in[1].T + ref_in[2], -1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, torch.autograd.grad((ref * up.double()).sum(), ref_in)):
        assert rel_err(a, r) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_seq, L", [(96, 32), (5, 2), (4, 3)])
def test_windows_backward_matches_fp64(dtype, n_seq, L):
    """The block-add backward of the key/value windows (the positions' layout) against autograd's unfold."""
    B, S, H, dh = 2, 3, 2, 5
    kv = torch.randn(B, n_seq + S * L, 2, H, dh, dtype=torch.float64)
    gk, gv = (torch.randn(B * S, H, n_seq + L, dh, dtype=torch.float64) for _ in range(2))
    ref_in = kv.clone().requires_grad_()
    win = ref_in.unfold(1, n_seq + L, L)  # (B, S, 2, H, dh, W)
    k_ref = win[:, :, 0].permute(0, 1, 2, 4, 3).reshape(B * S, H, n_seq + L, dh)
    v_ref = win[:, :, 1].permute(0, 1, 2, 4, 3).reshape(B * S, H, n_seq + L, dh)
    (ref,) = torch.autograd.grad((k_ref, v_ref), ref_in, (gk, gv))

    x = kv.to(dtype).requires_grad_()
    k, v = windows(x, n_seq, L)
    assert torch.equal(k.double(), k_ref.detach().to(dtype).double())
    (got,) = torch.autograd.grad((k, v), x, (gk.to(dtype), gv.to(dtype)))
    assert got.dtype == dtype
    # each position's gradient sums <= (n_seq + L) / L window copies: bf16 rounds the inputs and each add
    tol = 1e-6 if dtype == torch.float32 else 2**-8 * (1 + (n_seq + L) // L)
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hash_dropout_scale_is_exact_in_bf16(dtype):
    """x * 1/(1-p) with one rounding to the output dtype: the bf16 scale 1.109375 for 1/0.9 would bias
    every kept activation by -0.16%."""
    x = (torch.randn(4096, dtype=torch.float64) + 3).to(dtype).requires_grad_()
    keys = (12345 | 1, 678)
    y = _HashDropout.apply(x, 0.1, *keys)
    m = keep_scale(x.shape, 0.1, *keys).double()
    expect = (x.detach().double() * m).to(dtype)
    assert y.dtype == dtype and torch.equal(y, expect)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx, m.to(dtype) if dtype == torch.float32 else torch.ones_like(y).double().mul(m).to(dtype))
    kept = m > 0
    ratio = (y.double()[kept] / x.detach().double()[kept]).mean()
    assert abs(ratio - 1 / 0.9) < (1e-7 if dtype == torch.float32 else 2**-10)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_bf16_training_step_matches_fp64(dropout):
    """The whole training computation (band attention, hash dropout, adaptive softmax) under bf16 autocast
    against the same model in fp64: log-probabilities and every parameter gradient."""
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layer=2, n_head=2, d_head=16, d_ff=64, n_seq=12,
                      segment_len=8, cutoffs=[60, 200], bin_dims=[32, 8, 4], dropout=dropout, init_std=0.1)
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    ref_model = TransformerLM(cfg).double()
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    idx, y = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2, 40))

    def loss_and_grads(m: TransformerLM, bf16: bool):
        torch.manual_seed(1)  # the same dropout masks in both
        with autocast(bf16):
            h, _ = m(idx)
            lp = m.target_log_probs(h, y)
        return lp, torch.autograd.grad(lp.sum(), list(m.parameters()))

    ref_lp, ref_grads = loss_and_grads(ref_model, False)
    lp, grads = loss_and_grads(model, True)
    assert lp.dtype == torch.float32
    lp, ref_lp = lp.detach().double(), ref_lp.detach()
    # measured: max |error| 0.006, mean error < 8e-4, gradients 1.0-1.2% on average, 4% at most (a bias)
    assert float((lp - ref_lp).abs().max()) < 0.02  # log-probs ~ -5.7: ~2**-8 of them
    assert abs(float(lp.mean() - ref_lp.mean())) < 5e-3
    errs = {n: rel_err(g, r) for (n, _), g, r in zip(model.named_parameters(), grads, ref_grads)}
    assert max(errs.values()) < 0.08, errs  # through 2 layers of bf16 activations
    assert sum(errs.values()) / len(errs) < BF16_GRAD_RTOL, errs
