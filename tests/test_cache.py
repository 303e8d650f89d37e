"""Neural cache: vectorised == naive loop, sequences never mix, the mixture is a distribution,
chunked online evaluation == token-by-token, learned lambda/theta live in the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from micronet.model.cache import CacheConfig, EvalCache, TrainCache, attach_cache, cache_log_probs, mix_log_probs
from micronet.model.evaluation import evaluate_stream
from micronet.model.transformer import ModelConfig, TransformerLM


def naive_cache_log_probs(h, y, lp_model, lam, theta, n_cache):
    """Per sequence, per token: the definition of spec section 3, written as plainly as possible."""
    B, T, _ = h.shape
    out = torch.empty(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            window = list(range(max(0, t - n_cache), t))
            if not window:
                out[b, t] = lp_model[b, t]
                continue
            p = torch.softmax(theta * (h[b, window] @ h[b, t]), dim=0)
            p_cache = p[y[b, window] == y[b, t]].sum()
            out[b, t] = torch.log(lam * p_cache + (1 - lam) * lp_model[b, t].exp())
    return out


def random_stream(B=3, T=40, d=6, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, vocab, (B, T), generator=g)
    lp = torch.log_softmax(torch.randn(B, T, vocab, generator=g, dtype=torch.float64), -1)
    return h, y, lp.gather(-1, y[..., None])[..., 0], lp


@pytest.mark.parametrize("n_cache", [1, 5, 39, 100])
def test_training_cache_equals_naive_loop(n_cache):
    h, y, lpm, _ = random_stream()
    cache = TrainCache(CacheConfig(n_cache=n_cache, lam=0.3, theta=0.2)).double()
    lam, theta = cache.values()
    want = naive_cache_log_probs(h, y, lpm, lam, theta, n_cache)
    torch.testing.assert_close(cache(h, y, lpm), want, rtol=1e-12, atol=1e-12)
    # Small blocks take the band/offset paths that the default block size skips.
    lpc, m, e = cache_log_probs(h, y, h, y, theta, n_cache, block_elems=3 * (n_cache + 1) * 7)
    mixed = mix_log_probs(lpm, lpc, m, e, math.log(lam), math.log1p(-lam))
    torch.testing.assert_close(mixed, want, rtol=1e-12, atol=1e-12)


def test_a_sequence_never_sees_another_sequences_entries():
    h, y, lpm, _ = random_stream(B=2, T=30)
    cache = TrainCache(CacheConfig(n_cache=50)).double()
    before = cache(h, y, lpm)
    h2, y2 = h.clone(), y.clone()
    h2[1] = torch.randn_like(h2[1]) * 5
    y2[1] = y[0]  # sequence 1 now holds every value sequence 0 looks for
    after = cache(h2, y2, lpm)
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


def test_gradients_are_finite_and_reach_lambda_theta_and_h():
    h, y, lpm, _ = random_stream(B=2, T=20, vocab=50)  # many tokens without a match
    h.requires_grad_(True)
    cache = TrainCache(CacheConfig(n_cache=8)).double()
    (-cache(h, y, lpm).mean()).backward()
    for g in (h.grad, cache.theta_param.grad, cache.lambda_param.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_mixture_is_a_distribution_over_the_vocabulary():
    vocab = 7
    h, y, _, lp_full = random_stream(B=2, T=25, vocab=vocab)
    lam, theta = 0.4, 0.3
    per_word = []
    for w in range(vocab):  # full-distribution variant: every word as the "target"
        target = torch.full_like(y, w)
        lpc, m, e = cache_log_probs(h, target, h, y, theta, n_cache=6)
        per_word.append(mix_log_probs(lp_full[..., w], lpc, m, e, math.log(lam), math.log1p(-lam)))
    total = torch.logsumexp(torch.stack(per_word, -1), -1).exp()  # (B, T)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


@pytest.mark.parametrize("query_block", [None, 4])  # 4: blocks that straddle the empty slots
def test_eval_cache_chunked_equals_one_stream(query_block):
    h, y, lpm, _ = random_stream(B=1, T=61)
    want = naive_cache_log_probs(h, y, lpm, 0.2, 0.15, 17)
    cache = EvalCache(17, 0.2, 0.15, query_block=query_block)
    cuts = [(0, 1), (1, 9), (9, 30), (30, 31), (31, 61)]  # chunks shorter and longer than the cache
    got = torch.cat([cache(h[:, a:b], y[:, a:b], lpm[:, a:b]) for a, b in cuts], 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert cache.keys.shape[0] == 17 and cache.n_valid == 17
    cache.reset()  # a new split starts empty
    torch.testing.assert_close(cache(h[:, :5], y[:, :5], lpm[:, :5]), want[:, :5], rtol=1e-12, atol=1e-12)


def tiny_model(vocab=40):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=16, n_layer=1, n_head=2, d_head=8, d_ff=32, n_seq=8, segment_len=8,
                      cutoffs=[10, 20], bin_dims=[16, 8, 4])
    return TransformerLM(cfg).double()


def test_chunked_cached_evaluation_equals_token_by_token():
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 40, size=120)
    cache = EvalCache(30, 0.25, 0.3)
    one, n = evaluate_stream(model, tokens, chunk_len=1, cache=cache)
    chunked, _ = evaluate_stream(model, tokens, chunk_len=37, cache=cache)  # reset at the start of the call
    plain, _ = evaluate_stream(model, tokens, chunk_len=37)
    assert n == 119 and chunked == pytest.approx(one, rel=1e-12) and plain != pytest.approx(chunked, rel=1e-6)


def test_learned_parameters_are_in_state_dict_and_optimizer():
    model = tiny_model().float()
    cache = attach_cache(model, CacheConfig(n_cache=10, lam=0.07, theta=0.016))
    assert {"cache.theta_param", "cache.lambda_param"} <= set(model.state_dict())
    assert any(p is cache.theta_param for p in model.parameters())
    lam, theta = cache.values()
    assert lam == pytest.approx(0.07) and theta == pytest.approx(0.016)
    fixed = attach_cache(tiny_model().float(), CacheConfig(n_cache=10, learnable=False, lam=0.2))
    assert fixed.values()[0] == pytest.approx(0.2) and not list(fixed.parameters())
    assert attach_cache(tiny_model(), CacheConfig(n_cache=0)) is None
